"""Notebook helpers in opensora.viz: the image slider follows its labels; the data-parallel
diagram draws one box per worker and the collectives between them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from opensora import viz


def test_image_slider_shows_the_frame_of_the_chosen_label() -> None:
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[2] = 255
    box = viz.image_slider(frames, [0, 100, 999], "t")
    slider, image = box.children
    first = image.value
    slider.value = 999
    assert image.value != first and image.value == viz._png(frames[2])
    with pytest.raises(ValueError, match="2 labels for 3 frames"):
        viz.image_slider(frames, [0, 1])
    with pytest.raises(ValueError, match="uint8"):
        viz.image_slider(frames.astype(np.float32), [0, 1, 2])


@pytest.mark.parametrize("sharded", [False, True])
def test_data_parallel_diagram_draws_every_worker(sharded: bool) -> None:
    fig, ax = plt.subplots()
    viz.draw_data_parallel(ax, "dp", state_sharded=sharded, workers=2)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("AllReduce") == 1 and {"worker 0", "worker 1"} <= set(texts)
    assert ("broadcast owned" in texts) == sharded
    assert sum("AdamW state, part" in t for t in texts) == (2 if sharded else 0)
    plt.close(fig)
