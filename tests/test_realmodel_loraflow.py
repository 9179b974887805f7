"""The real-model experiment's LoRA-Flow trainings (dlp_lora/realmodel/loraflow_stage.py): seeds run
side by side in worker processes give what they give one by one in this process, each is cached as it
ends, and a cached seed is not trained again. On a tiny Llama with SmolLM2's tokenizer and chat
template (tests/fixtures), two rank-4 adapters, one epoch."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import serving_fixtures as sf
import torch

from dlp_lora.artifacts import load_tokenizer
from dlp_lora.realmodel.loraflow_stage import SeedJob, _pairs, run_seeds, train_and_score
from dlp_lora.realmodel.pipeline import Recipe, chat_prompt

pytestmark = pytest.mark.slow


def _jobs(art, tmp_path, tokenizer) -> list[SeedJob]:
    recipe = dataclasses.replace(Recipe.smoke(), loraflow_epochs=2, loraflow_batch=2, eval_batch=2,
                                 max_new_tokens=2)
    words = ("bonjour", "merci", "oui", "non", "chat")
    examples = [(f"say {word} twice", f"{word} {word}") for word in words]
    pairs = _pairs(tokenizer, examples, chat_prompt)
    adapters = {name: str(path) for name, path in art["adapters"].items()}
    return [SeedJob("fusion", seed, str(art["model"]), adapters, pairs[:4], pairs[4:], [examples[4][0]],
                    [examples[4][1]], str(tmp_path / f"gates{seed}"), recipe, 1) for seed in (0, 1)]


def test_seeds_side_by_side_equal_seeds_one_by_one(tmp_path):
    art = sf.build_chat(tmp_path / "art")
    tokenizer = load_tokenizer(art["model"], "--model")
    jobs = _jobs(art, tmp_path, tokenizer)
    paths = [tmp_path / f"seed{job.seed}.json" for job in jobs]
    lines: list[str] = []
    side_by_side = run_seeds(jobs, paths, None, None, lines.append)
    workers = min(2, os.cpu_count() or 1)
    assert [r["concurrent"] for r in side_by_side] == [workers] * 2
    assert [json.loads(p.read_text()) for p in paths] == side_by_side
    assert all(r["elapsed_share_seconds"] > 0 and r["wall_seconds"] > 0 for r in side_by_side)
    assert all((tmp_path / f"gates{job.seed}" / "loraflow_gates.safetensors").is_file() for job in jobs)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(art["model"]), dtype=torch.float32).eval()
    torch_threads = torch.get_num_threads()
    one_by_one = [train_and_score(job, model, tokenizer, lines.append) for job in jobs]
    torch.set_num_threads(torch_threads)
    for a, b in zip(side_by_side, one_by_one, strict=True):
        assert a["epoch_losses"] == pytest.approx(b["epoch_losses"], rel=1e-4)
        assert a["dev_losses"] == pytest.approx(b["dev_losses"], rel=1e-4)
        assert a["exact_match"] == b["exact_match"] and a["best_epoch"] == b["best_epoch"]
    assert side_by_side[0]["epoch_losses"] != side_by_side[1]["epoch_losses"]  # the seed matters

    stamps = [p.stat().st_mtime_ns for p in paths]
    assert run_seeds(jobs, paths, None, None, lines.append) == side_by_side  # cached: nothing runs
    assert [p.stat().st_mtime_ns for p in paths] == stamps
