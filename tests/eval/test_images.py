"""Image folders with a manifest.jsonl (directalign.eval.images): a round trip, and one-line errors."""

import pytest
import torch

from directalign.config import build_config
from directalign.errors import UserError
from directalign.eval.images import load_image_folder, save_images


def test_saved_folder_loads_back(tmp_path):
    cfg = build_config({}, ["sampling.shift=2.0"])
    images = torch.rand(3, 3, 8, 8)
    save_images(images, ["a", "b", "c"], [0, 1, 2], cfg, None, tmp_path)
    loaded, records = load_image_folder(tmp_path)
    assert loaded.shape == images.shape and (loaded - images).abs().max() <= 0.5 / 255 + 1e-6
    assert [r["prompt"] for r in records] == ["a", "b", "c"] and records[0]["shift"] == 2.0


@pytest.mark.parametrize("manifest", [None, "not json\n", '{"file": 3, "prompt": "a"}\n', '["x"]\n',
                                      '{"file": "00000.png"}\n', '{"file": "gone.png", "prompt": "a"}\n', "\n"])
def test_bad_folders_are_one_line_user_errors(manifest, tmp_path):
    if manifest is not None:
        (tmp_path / "manifest.jsonl").write_text(manifest)
    with pytest.raises(UserError) as e:
        load_image_folder(tmp_path)
    assert len(str(e.value).splitlines()) == 1
