"""End to end on a CPU in about a minute: train a tiny HTC model, compress an image once, ask it twice.

    python -m htc_model.demo [--steps 120] [--max_seconds 60] [--seed 0] [--workdir DIR]

1. Writes the synthetic task (a coloured square on a black or white background; "what colour is the
   square ?" / "what colour is the background ?") and trains the tiny model on it with
   ``htc_model.train`` (the HF Trainer), stopping at ``--steps`` or ``--max_seconds``.
2. Compresses one held-out image (``model.compress``: the prompt's KV up to ``<voco>``, visual KV
   dropped) and answers both questions from that one object (``generate(compressed=...)``).
3. Prints the KV bytes and the stage latencies (``latency_breakdown``) of vanilla (every visual token
   kept in the cache and attended, LLaVA's way) against HTC.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import TrainerCallback

from .configuration_htc import HTCConfig
from .data import QUESTIONS, make_synthetic_dataset, prompt_ids
from .train import answer_accuracy
from .train import main as train_main


class _StopAfter(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def _split_at_image(ids: list[int], image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prefix, question)``: the one-shot prompt's ids before and after its ``<image>``."""
    k = ids.index(image_token_id)
    return torch.tensor(ids[:k]), torch.tensor(ids[k + 1 :])


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def run(steps: int = 120, max_seconds: float = 60.0, seed: int = 0, workdir: str | None = None) -> dict:
    """The demo; prints as it goes and returns what it printed as numbers (for tests):
    ``{"steps", "accuracy", "answers", "truth", "compressed_bytes", "htc", "vanilla"}``."""
    workdir = workdir or tempfile.mkdtemp(prefix="htc_demo_")
    questions = tuple(QUESTIONS)
    train = make_synthetic_dataset(os.path.join(workdir, "train"), 256, seed=seed, questions=questions)
    held_out = make_synthetic_dataset(
        os.path.join(workdir, "held_out"), 32, seed=seed + 1, questions=questions
    )
    print(f"1. training the tiny model on {train} (at most {steps} steps / {max_seconds:.0f} s)")
    t0 = time.perf_counter()
    args = ["--tiny", "--data_path", train, "--output_dir", os.path.join(workdir, "model")]
    args += ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    args += ["--seed", str(seed), "--max_steps", str(steps), "--per_device_train_batch_size", "16"]
    args += ["--learning_rate", "3e-3", "--lr_scheduler_type", "constant"]
    args += ["--logging_steps", str(max(1, min(20, steps // 4)))]
    args += ["--log_level", "warning"]
    trainer = train_main(args, callbacks=[_StopAfter(max_seconds)])
    model, processor = trainer.model.eval(), trainer.processing_class
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    accuracy = answer_accuracy(model, processor, held_out)
    print(
        f"   {trainer.state.global_step} steps in {time.perf_counter() - t0:.1f} s, loss "
        f"{losses[0]:.2f} -> {losses[-1]:.2f}; held-out accuracy {accuracy:.0%} (chance 25% / 50%)"
    )

    # 2. compress once, ask twice (three held-out images, compressed in one call)
    from PIL import Image

    with open(held_out) as f:
        records = json.load(f)[:3]
    folder = os.path.dirname(held_out)
    images = [Image.open(os.path.join(folder, r["image"])).convert("RGB") for r in records]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    tok, img = processor.tokenizer, processor.image_token_id
    prompts = [prompt_ids(tok, f"<image>\n{q}") for q in QUESTIONS.values()]
    prefix, _ = _split_at_image(prompts[0], img)
    compressed = model.compress(pixels, prefix_ids=prefix)
    ids = torch.stack([_split_at_image(p, img)[1] for p in prompts])  # same length: no padding
    print(
        f"2. {len(records)} held-out images compressed once ({_kib(compressed.nbytes)} of KV in all: the "
        f"prefix once, one <voco> per image); two questions to each:"
    )
    answers, truth = [], []
    for i, record in enumerate(records):
        out = model.generate(ids, compressed=compressed.select([i, i]), max_new_tokens=1, do_sample=False)
        # the same questions with the image in the prompt (one-shot): the same tokens
        one_shot = torch.tensor(prompts)
        again = model.generate(one_shot, pixel_values=pixels[[i, i]], max_new_tokens=1, do_sample=False)
        assert torch.equal(out[:, ids.shape[1] :], again[:, one_shot.shape[1] :])
        said = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        expected = [record["colours"][k] for k in QUESTIONS]
        marks = ["right" if a == e else f"wrong, it is {e}" for a, e in zip(said, expected)]
        print(f"   image {i}: square? {said[0]} ({marks[0]}); background? {said[1]} ({marks[1]})")
        answers.append(said)
        truth.append(expected)

    # 3. vanilla vs HTC: KV bytes and latency of the same prompt
    one_shot = torch.tensor([prompts[0]])
    rows = {
        mode: model.latency_breakdown(pixels[:1], one_shot, mode=mode, decode_tokens=8, repeats=5)
        for mode in ("vanilla", "htc")
    }
    print(
        "3. one image + question, greedy (ms, medians of 5; on the CPU the encoders run one after the other; "
        "a tiny model on a shared machine: the KV bytes are exact, the times are noise-level)"
    )
    fields = [
        "vision_encoder_ms",
        "mgvq_encoder_ms",
        "projection_fusion_ms",
        "prefill_ms",
        "decode_ms_per_token",
    ]
    print(f"   {'':22s}{'vanilla':>12s}{'htc':>12s}")
    for name in fields:
        print(f"   {name:22s}{getattr(rows['vanilla'], name):12.2f}{getattr(rows['htc'], name):12.2f}")
    kv = [_kib(rows[m].kv_bytes) for m in ("vanilla", "htc")]
    print(f"   {'KV cache after decode':22s}{kv[0]:>12s}{kv[1]:>12s}")
    big = HTCConfig()
    text = big.text_config
    per_token = (
        2
        * text.num_hidden_layers
        * text.num_key_value_heads
        * (text.hidden_size // text.num_attention_heads)
        * 2
    )
    print(
        f"   at the paper's 7B shape (bf16) one image's {big.num_visual_tokens} visual tokens hold "
        f"{big.num_visual_tokens * per_token / 2**20:.0f} MiB of KV; its <voco> token holds "
        f"{big.num_voco_tokens * per_token / 2**20:.1f} MiB"
    )
    return {
        "steps": trainer.state.global_step,
        "accuracy": accuracy,
        "answers": answers,
        "truth": truth,
        "compressed_bytes": compressed.nbytes,
        "htc": rows["htc"],
        "vanilla": rows["vanilla"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m htc_model.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps (at most)")
    parser.add_argument("--max_seconds", type=float, default=60.0, help="training time limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where data and the model go (default: a temp dir)")
    args = parser.parse_args(argv)
    return run(args.steps, args.max_seconds, args.seed, args.workdir)


if __name__ == "__main__":
    main()
