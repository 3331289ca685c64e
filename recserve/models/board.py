"""The run's progress, posted by Ray Train's rank 0 and read by the driver's bar (a Ray actor: it imports
nothing, so its process stays small)."""


class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict = {}

    def put(self, **state) -> None:
        self.state.update(state)

    def get(self) -> dict:
        return self.state
