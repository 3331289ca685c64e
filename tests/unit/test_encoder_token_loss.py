"""The distillation's token loss (``recserve.encoder.distill.token_loss``): 1 - cosine between the student's and the
teacher's last hidden state of each real token, padding left out."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from recserve.encoder.distill import token_loss  # noqa: E402


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)]
    got = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return got, mask, targets


def test_it_is_nothing_when_every_token_state_points_where_the_teachers_does() -> None:
    got, mask, targets = _batch()
    got[0, :3] = 2.5 * targets[0]
    got[1] = 0.5 * targets[1]
    assert float(token_loss(got, mask, targets)) == pytest.approx(0.0, abs=1e-6)


def test_padding_does_not_count_whatever_the_student_puts_there() -> None:
    got, mask, targets = _batch()
    before = float(token_loss(got, mask, targets))
    got[0, 3:] = torch.randn(2, 8) * 100
    assert float(token_loss(got, mask, targets)) == pytest.approx(before)


def test_it_is_the_mean_of_one_minus_cosine_over_the_real_tokens() -> None:
    got, mask, targets = _batch()
    want = [1 - torch.nn.functional.cosine_similarity(got[0, i], targets[0][i], dim=0) for i in range(3)]
    want += [1 - torch.nn.functional.cosine_similarity(got[1, i], targets[1][i], dim=0) for i in range(5)]
    assert float(token_loss(got, mask, targets)) == pytest.approx(float(sum(want) / 8), rel=1e-5)


def test_it_sends_gradients_to_the_student_only_through_real_tokens() -> None:
    got, mask, targets = _batch()
    got.requires_grad_(True)
    token_loss(got, mask, targets).backward()
    assert got.grad[0, 3:].abs().sum() == 0 and got.grad[0, :3].abs().sum() > 0
