"""htc_model.train / htc_model.data: LLaVA-format data, HF Trainer training of the tiny model (CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL", reason="the synthetic images and CLIPImageProcessor need pillow")

from htc_model import HTCForConditionalGeneration, HTCProcessor  # noqa: E402
from htc_model.data import (  # noqa: E402
    IGNORE_INDEX,
    DataCollator,
    LLaVADataset,
    conversation_ids,
    make_synthetic_dataset,
    prompt_ids,
    synthetic_words,
    word_processor,
)
from htc_model.train import answer_accuracy, main  # noqa: E402
from tests.hf_common import star_backend  # noqa: E402, F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU, no reports, no checkpoints, fixed seed: the arguments every run here shares.
COMMON = [
    "--use_cpu",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    train = make_synthetic_dataset(str(root / "train"), 256, seed=0)
    held_out = make_synthetic_dataset(str(root / "held_out"), 32, seed=1)
    return train, held_out


# --------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------


def test_conversation_ids_labels_answers_only():
    tok = word_processor(synthetic_words()).tokenizer
    conv = [
        {"from": "human", "value": "<image>\nwhat colour is the square ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "what colour is the background ?"},
        {"from": "gpt", "value": "white"},
    ]
    ids, labels = conversation_ids(tok, conv)
    words = tok.convert_ids_to_tokens(ids)
    assert (
        words
        == (
            "<s> USER: <image> what colour is the square ? ASSISTANT: red </s> "
            "USER: what colour is the background ? ASSISTANT: white </s>"
        ).split()
    )
    assert [w for w, lab in zip(words, labels) if lab != IGNORE_INDEX] == ["red", "</s>", "white", "</s>"]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert ids[: len(prompt_ids(tok, conv[0]["value"]))] == prompt_ids(tok, conv[0]["value"])
    with pytest.raises(ValueError, match="roles"):
        conversation_ids(tok, conv[1:] + conv[:1])
    with pytest.raises(ValueError, match="pairs"):
        conversation_ids(tok, conv[:3])


def test_dataset_and_collator(data, tmp_path):
    train, _ = data
    proc = word_processor(synthetic_words())
    ds = LLaVADataset(train, proc)
    items = [ds[0], ds[1]]
    assert items[0]["pixel_values"].shape == (1, 3, 32, 32)
    batch = DataCollator(proc.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 2
    # a record whose <image> tokens and images disagree is refused when the file is read
    with open(train) as f:
        records = json.load(f)
    records[3]["image"] = [records[3]["image"]] * 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="'000003': 1 <image> token"):
        LLaVADataset(str(bad), proc, image_folder=os.path.dirname(train))
    # ... and so are swapped roles, a missing image and a <voco> in the text (not at the first batch)
    for edit, match in (
        (lambda r: r["conversations"].reverse(), "roles"),
        (lambda r: r.update(image="missing.png"), "not found"),
        (lambda r: r["conversations"][1].update(value="a <voco>"), "inserts them"),
    ):
        records = json.loads(open(train).read())
        edit(records[2])
        bad.write_text(json.dumps(records))
        with pytest.raises(ValueError, match=match):
            LLaVADataset(str(bad), proc, image_folder=os.path.dirname(train))
    with pytest.raises(ValueError, match="set tokenizer.pad_token"):
        DataCollator(None)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny model trained on the square-colour task (~10 s on an idle 2-core CPU)."""
    train, _ = data
    out = tmp_path_factory.mktemp("trained")
    args = ["--tiny", "--data_path", train, "--output_dir", str(out), *COMMON]
    args += ["--max_steps", "80", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3"]
    args += ["--lr_scheduler_type", "constant", "--logging_steps", "10"]
    return main(args), out


def test_training_lowers_the_loss_and_answers_better_than_chance(data, trained):
    trainer, out = trained
    losses = _losses(trainer)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.5 * losses[0]
    # held-out images: 4 colours, chance is 1/4
    model, processor = trainer.model, trainer.processing_class
    accuracy = answer_accuracy(model, processor, data[1])
    assert accuracy >= 0.5, accuracy


def test_training_freezes_the_encoders_and_saves_a_checkpoint_that_reloads(data, trained):
    trainer, out = trained
    model = trainer.model
    torch.manual_seed(0)
    fresh = HTCForConditionalGeneration(model.config)  # same seed as --seed 0 before the build
    for name in ("vision_tower", "quantizer"):
        a, b = getattr(model, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # frozen
    assert not torch.equal(model.voco_embeddings, fresh.voco_embeddings)
    back = HTCForConditionalGeneration.from_pretrained(out).eval()
    processor = HTCProcessor.from_pretrained(out)
    assert processor.image_token_id == model.config.image_token_id
    ds = LLaVADataset(data[1], processor)
    batch = DataCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**batch).logits)


def test_lora_trains_adapters_and_merges(data, tmp_path):
    train, _ = data
    out = tmp_path / "lora"
    args = [
        "--tiny",
        "--llm",
        "lora",
        "--lora_r",
        "4",
        "--data_path",
        train,
        "--output_dir",
        str(out),
        *COMMON,
    ]
    args += ["--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"]
    trainer = main(args)
    model = trainer.model
    torch.manual_seed(0)
    fresh = HTCForConditionalGeneration(model.config)
    lm, lm0 = model.language_model.state_dict(), fresh.language_model.state_dict()
    assert lm.keys() == lm0.keys()  # merged: plain Linear layers again, no lora_A / base_layer keys
    changed = {k for k in lm if not torch.equal(lm[k], lm0[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted layers
    assert not torch.equal(
        model.continuous_projector.linear_1.weight, fresh.continuous_projector.linear_1.weight
    )
    back = HTCForConditionalGeneration.from_pretrained(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_from_llava_then_from_checkpoint_with_a_frozen_llm(data, tmp_path):
    """--llava_dir (a tiny LLaVA and its processor saved here), then --model_name_or_path on the
    result with --llm frozen: only the projectors and <voco> move."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from htc_model import HTCConfig

    train, _ = data
    tiny, proc = HTCConfig.tiny(), word_processor(synthetic_words())
    llava_cfg = LlavaConfig(
        vision_config=tiny.vision_config.to_dict(),
        text_config=tiny.text_config.to_dict(),
        image_token_id=proc.image_token_id,
        vision_feature_layer=-2,
    )
    LlavaForConditionalGeneration(llava_cfg).save_pretrained(tmp_path / "llava")
    LlavaProcessor(
        image_processor=proc.image_processor, tokenizer=proc.tokenizer, patch_size=8
    ).save_pretrained(tmp_path / "llava")
    steps = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--data_path", train, *COMMON]
    first = main(["--llava_dir", str(tmp_path / "llava"), "--output_dir", str(tmp_path / "a"), *steps])
    cfg = first.model.config
    assert (cfg.image_token_id, cfg.voco_token_id) == (proc.image_token_id, proc.image_token_id + 1)
    assert cfg.continuous_projector == "mlp2x_gelu"
    assert first.processing_class.voco_token_id == cfg.voco_token_id
    before = HTCForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()
    second = main(
        [
            "--model_name_or_path",
            str(tmp_path / "a"),
            "--llm",
            "frozen",
            "--output_dir",
            str(tmp_path / "b"),
            *steps,
        ]
    )
    after = second.model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"continuous_projector", "discrete_projector", "voco_embeddings"}


def test_bad_arguments(data, tmp_path):
    train, _ = data
    with pytest.raises(ValueError, match="exactly one"):
        main(["--data_path", train, "--output_dir", str(tmp_path), *COMMON])
    with pytest.raises(ValueError, match="--llm"):
        main(["--tiny", "--llm", "half", "--data_path", train, "--output_dir", str(tmp_path), *COMMON])


def test_demo_runs(tmp_path, capsys):
    from htc_model import demo

    result = demo.run(steps=3, max_seconds=30, workdir=str(tmp_path))  # a smoke run: learns nothing
    assert result["steps"] == 3 and 0 <= result["accuracy"] <= 1
    assert len(result["answers"]) == 3 and all(len(a) == 2 for a in result["answers"])
    htc, vanilla = result["htc"], result["vanilla"]
    assert htc.prompt_length == vanilla.prompt_length and vanilla.kv_bytes > 2 * htc.kv_bytes
    printed = capsys.readouterr().out
    assert "compressed once" in printed and "KV cache after decode" in printed


def _torchrun_unavailable() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "torch.distributed has no gloo backend (needed for CPU torchrun)"
    return None


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
def test_torchrun_two_processes(data, tmp_path):
    """``torchrun --nproc_per_node=2`` (gloo, CPU) runs the unchanged training script: two ranks of
    batch 4 make a global batch of 8, so each logged step advances 8/256 of an epoch."""
    train, _ = data
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "htc_model.train", "--tiny", "--data_path", train, "--output_dir", str(out), *COMMON]
    cmd += ["--ddp_backend", "gloo", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    cmd += ["--logging_steps", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = [line for line in done.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2, done.stdout  # rank 0 logs; rank 1 stays quiet
    assert f"'epoch': '{8 / 256}'" in logs[0]  # the world size is 2
    back = HTCForConditionalGeneration.from_pretrained(out)
    assert back.config.image_token_id == HTCProcessor.from_pretrained(out).image_token_id
