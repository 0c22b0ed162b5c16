import json

from directalign.config import build_config
from directalign.training import train


def test_three_steps_end_to_end(random_world, tmp_path):
    cfg = build_config({}, [f"run.output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=2",
                            "srpo.rollout_steps=2", "eval.seeds=[0]", "eval.steps=2", "eval.best_of=2",
                            "eval.prompts=tiny-world:heldout", "run.progress=false"])
    result = train(cfg, log=lambda *_: None)
    s = json.loads((result.run_dir / "summary.json").read_text())
    assert {"reward_before", "reward_after", "reward_best_of_2", "judge_before", "judge_after"} <= set(s)
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
