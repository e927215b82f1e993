import numpy as np
import torch

from weakseg.dihedral import (
    DIHEDRAL_VIEWS,
    dihedral_mean_tensor,
    dihedral_view,
    dihedral_view_tensor,
    undo_dihedral_view,
    undo_dihedral_view_tensor,
)


def test_every_dihedral_view_is_undone_on_square_and_oblong_tiles() -> None:
    assert len(set(DIHEDRAL_VIEWS)) == 8
    for shape in ((2, 5, 5), (2, 4, 7)):
        maps = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        views = [dihedral_view(maps, turns, flipped) for turns, flipped in DIHEDRAL_VIEWS]
        assert len({view.tobytes() + bytes(view.shape) for view in views}) == 8  # eight different views
        for view, (turns, flipped) in zip(views, DIHEDRAL_VIEWS, strict=True):
            np.testing.assert_array_equal(undo_dihedral_view(view, turns, flipped), maps)


def test_tensor_views_are_the_numpy_views_of_channels_first_batches() -> None:
    images = np.arange(2 * 4 * 7 * 3, dtype=np.float32).reshape(2, 4, 7, 3)  # (N, H, W, C), oblong
    channels_first = torch.from_numpy(images).permute(0, 3, 1, 2)
    for turns, flipped in DIHEDRAL_VIEWS:
        view = dihedral_view_tensor(channels_first, turns, flipped)
        np.testing.assert_array_equal(view.permute(0, 2, 3, 1).numpy(), dihedral_view(images, turns, flipped))
        red = view[:, 0]
        np.testing.assert_array_equal(undo_dihedral_view_tensor(red, turns, flipped).numpy(), images[..., 0])


def test_dihedral_mean_tensor_keeps_an_equivariant_map_and_cancels_an_orientation_bias() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((3, 2, 6, 6), generator=generator)
    calls: list[torch.Size] = []

    def first_channel(views: torch.Tensor) -> torch.Tensor:
        calls.append(views.shape)
        return views[:, 0]  # follows the tile wherever it turns

    torch.testing.assert_close(dihedral_mean_tensor(first_channel, images), images[:, 0])
    assert len(calls) == 8
    oblong = torch.rand((1, 2, 4, 7), generator=generator)
    assert {tuple(shape[2:]) for shape in calls} == {(6, 6)}
    torch.testing.assert_close(dihedral_mean_tensor(first_channel, oblong), oblong[:, 0])

    def left_to_right(views: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(views.shape[3], dtype=torch.float32)  # highest on the right of every view
        return ramp.expand(views.shape[0], views.shape[2], views.shape[3])

    # Averaged over the eight views, "the right side" is every side: the bias becomes a flat map.
    torch.testing.assert_close(dihedral_mean_tensor(left_to_right, images), torch.full((3, 6, 6), 2.5))
