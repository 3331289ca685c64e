"""The canary rollout operator: the ModelRollout resource, a pure state machine, and kopf handlers."""
