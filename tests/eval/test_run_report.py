"""``directalign report``: the self-contained report.html of a run (directalign.report)."""

import json

# The plots of the tiny run's report: the four standard training curves (reward, loss, gradient norm, seconds per
# step) and every metric the SRPO method logs in metrics.jsonl (per branch: k, reward and sigma).
STANDARD_CURVES = 4
SRPO_METRICS = ("denoise_k", "denoise_reward", "denoise_sigma", "inversion_k", "inversion_reward", "inversion_sigma")


def test_report_html_is_self_contained(random_world, tiny_run, tmp_path, cli):
    from directalign.report import write_report

    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    text = path.read_text()
    assert text.count('<svg class="plot"') == STANDARD_CURVES + len(SRPO_METRICS)
    for key in SRPO_METRICS:
        assert key in text
    n_prompts = json.loads((tiny_run / "summary.json").read_text())["eval_prompts"]
    assert text.count('src="data:image/png;base64,') == 2 * n_prompts
    assert "<script" not in text.lower()
    for attr in ("src=", "href="):
        for chunk in text.split(attr)[1:]:
            assert chunk[1:].startswith("data:"), chunk[:80]
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    for key in ("saturation", "brightness", "colourfulness", "hf_energy", "diversity_pixel", "textured_share"):
        assert key in text
    code, _, _ = cli(["report", tiny_run, "--out", tmp_path / "r.html"])
    assert code == 0 and (tmp_path / "r.html").is_file()


def test_report_warns_on_drift(tmp_path):
    """A fabricated run whose 'after' samples are saturated red: the report says so."""
    import torch

    from directalign.config import build_config
    from directalign.report import render_report
    from directalign.report_images import save_grid

    cfg = build_config({}, ["eval.seeds=[0,1]"])
    run = tmp_path / "fake"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    n = 24 * 2
    g = torch.Generator().manual_seed(0)
    before = 0.4 + 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    after = torch.zeros(n, 3, 32, 32)
    after[:, 0] = 1.0
    save_grid(before, run / "samples" / "before.png", ncol=8)
    save_grid(after, run / "samples" / "after.png", ncol=8)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i, "reward": 0.1 * i,
                                                           "grad_norm": float("nan") if i == 2 else 1.0,
                                                           "step_seconds": 0.5}) + "\n" for i in range(1, 6)))
    text = render_report(run)
    assert 'class="warn"' in text and "saturation moved by" in text and "diversity_pixel fell by" in text
    assert "No summary.json" in text
    assert text.count('<svg class="plot"') == 4


def test_report_of_an_edit_run_shows_each_prompts_source_image(tmp_path):
    """Qwen-Image-Edit: the samples table has the image each held-out prompt edits beside base and tuned."""
    import numpy as np
    import torch
    from PIL import Image

    from directalign.config import build_config
    from directalign.report import GRID_UPSCALE, render_report
    from directalign.report_images import save_grid

    prompts = ["make the circle blue", "add a square"]
    (tmp_path / "src").mkdir()
    colours = [(255, 0, 0), (0, 128, 255)]
    for i, c in enumerate(colours):
        Image.fromarray(np.full((48, 64, 3), c, dtype=np.uint8)).save(tmp_path / "src" / f"s{i}.png")
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": p, "image": f"src/s{i}.png"}) + "\n"
                                for i, p in enumerate(prompts)))
    cfg = build_config({}, ["model.family=qwen-image-edit", "model.height=16", "model.width=16",
                            f"eval.prompts={manifest}", "eval.seeds=[0,1]"])
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    for side in ("before", "after"):
        save_grid(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), run / "samples" / f"{side}.png",
                  ncol=8)
    text = render_report(run)
    assert "<th>source image</th><th>base model</th><th>tuned model</th>" in text
    side = 16 * GRID_UPSCALE
    for prompt in prompts:
        assert f'width="{side}" height="{side}" alt="source: {prompt}"' in text
    # the embedded thumbnails are the manifest's images, in prompt order
    import base64
    import io
    import re

    uris = re.findall(r'src="data:image/png;base64,([^"]+)" width="\d+" height="\d+" alt="source: ', text)
    got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB"))[0, 0].tolist() for u in uris]
    assert got == [list(c) for c in colours]
    # a text-to-image run has no such column
    (run / "config.yaml").write_text(build_config({}, ["model.height=16", "model.width=16", f"eval.prompts={manifest}",
                                                       "eval.seeds=[0,1]"]).to_yaml())
    text = render_report(run)
    assert "source image" not in text and "<th>base model</th><th>tuned model</th>" in text
