"""Train HTC-VLM with the Hugging Face ``Trainer`` (so ``torchrun``, DeepSpeed and FSDP work unchanged).

    python -m htc_model.train --tiny --data_path data/data.json --output_dir out \\
        --max_steps 200 --per_device_train_batch_size 16 --learning_rate 3e-3

Any ``TrainingArguments`` flag works (``--bf16``, ``--deepspeed ds.json``, ``--gradient_accumulation_steps``,
...). The model comes from one of ``--model_name_or_path`` (an HTC checkpoint directory with its
processor), ``--llava_dir`` (a local LLaVA-1.5 checkpoint; ``--mgvq_checkpoint``), or ``--tiny`` (a
random tiny model and a word-level tokenizer over the training file's words: tests and demos).

What trains (paper Table 6): the projectors P_v and P_d and the ``<voco>`` embeddings always; the
vision tower and MGVQ never; the language model fully (``--llm full``), through LoRA adapters
(``--llm lora``, merged into the weights when training ends), or not at all (``--llm frozen``).
The output directory receives the trained model (``save_pretrained``: a plain HTC checkpoint) and
its processor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from .configuration_htc import HTCConfig
from .data import DataCollator, LLaVADataset, prompt_ids, word_processor
from .modeling_htc import HTCForConditionalGeneration
from .processing_htc import HTCProcessor

__all__ = ["DataArguments", "ModelArguments", "answer_accuracy", "main"]

LLM_MODES = ("full", "lora", "frozen")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "an HTC checkpoint directory (model and processor)"}
    )
    llava_dir: str | None = field(default=None, metadata={"help": "start from a local LLaVA-1.5 checkpoint"})
    mgvq_checkpoint: str | None = field(default=None, metadata={"help": "MGVQ weights (with --llava_dir)"})
    tiny: bool = field(default=False, metadata={"help": "a random tiny model (HTCConfig.tiny) for tests"})
    num_voco_tokens: int | None = field(
        default=None, metadata={"help": "for a new model (--tiny, --llava_dir)"}
    )
    llm: str = field(default="full", metadata={"help": "train the language model: full | lora | frozen"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "comma-separated names of the language model's linear layers"},
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-format JSON (a list of records)"})
    image_folder: str | None = field(default=None, metadata={"help": "default: the JSON file's folder"})
    system_prompt: str = field(default="", metadata={"help": "written before the first USER:"})


def _words(data_path: str) -> list[str]:
    """Every whitespace-separated word of a LLaVA JSON file's conversations (for --tiny's tokenizer)."""
    from .data import synthetic_words

    with open(data_path) as f:
        records = json.load(f)
    words = set(synthetic_words())
    for r in records:
        for turn in r.get("conversations", []):
            words.update(w for w in turn.get("value", "").split() if w != "<image>")
    return sorted(words)


def _build(margs: ModelArguments, dargs: DataArguments) -> tuple[HTCForConditionalGeneration, HTCProcessor]:
    sources = [margs.model_name_or_path is not None, margs.llava_dir is not None, margs.tiny]
    if sum(sources) != 1:
        raise ValueError("htc_model.train: give exactly one of --model_name_or_path, --llava_dir, --tiny")
    overrides = {} if margs.num_voco_tokens is None else {"num_voco_tokens": margs.num_voco_tokens}
    if margs.model_name_or_path is not None:
        if overrides:
            raise ValueError("htc_model.train: --num_voco_tokens applies to a new model only")
        model = HTCForConditionalGeneration.from_pretrained(margs.model_name_or_path)
        return model, HTCProcessor.from_pretrained(margs.model_name_or_path)
    if margs.llava_dir is not None:
        from transformers import AutoProcessor

        llava = AutoProcessor.from_pretrained(margs.llava_dir, local_files_only=True)
        processor = HTCProcessor(llava.image_processor, llava.tokenizer)
        model = HTCForConditionalGeneration.from_llava(
            margs.llava_dir,
            mgvq_checkpoint=margs.mgvq_checkpoint,
            image_token_id=processor.image_token_id,
            voco_token_id=processor.voco_token_id,
            **overrides,
        )
        return model, processor
    tiny = HTCConfig.tiny()
    processor = word_processor(_words(dargs.data_path), image_size=tiny.vision_config.image_size)
    text = {**tiny.text_config.to_dict(), "vocab_size": len(processor.tokenizer)}
    config = HTCConfig.tiny(
        text_config=text,
        image_token_id=processor.image_token_id,
        voco_token_id=processor.voco_token_id,
        **overrides,
    )
    return HTCForConditionalGeneration(config), processor


def _set_trainable(model: HTCForConditionalGeneration, margs: ModelArguments) -> None:
    """Freeze the encoders, train the projectors and ``<voco>``; the LM per ``--llm``."""
    if margs.llm not in LLM_MODES:
        raise ValueError(f"htc_model.train: --llm must be one of {LLM_MODES}, got {margs.llm!r}")
    model.requires_grad_(False)
    for module in (model.continuous_projector, model.discrete_projector):
        if module is not None:
            module.requires_grad_(True)
    model.voco_embeddings.requires_grad_(True)
    if margs.llm == "full":
        model.language_model.requires_grad_(True)
    elif margs.llm == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = [t.strip() for t in margs.lora_target_modules.split(",") if t.strip()]
        config = LoraConfig(
            r=margs.lora_r,
            lora_alpha=margs.lora_alpha,
            lora_dropout=margs.lora_dropout,
            target_modules=targets,
        )
        # In place, inside the LM: the model stays an HTCForConditionalGeneration, so the Trainer's
        # checkpoints are HTC checkpoints (with the adapters) and the projectors/<voco> still train.
        inject_adapter_in_model(config, model.language_model)


def _merge_lora(model: torch.nn.Module) -> None:
    """Fold every LoRA adapter into its base layer and put the base layer back (a plain model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def main(argv: list[str] | None = None, callbacks: list | None = None) -> Trainer:
    """Parse ``argv`` (default: ``sys.argv[1:]``), train, save the model and processor to
    ``--output_dir``. ``callbacks``: extra ``TrainerCallback``s. Returns the ``Trainer``: ``.model``
    is the trained model (LoRA merged), ``.state.log_history`` the logged losses,
    ``.processing_class`` the processor."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    margs, dargs, targs = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    # Our dataset yields exactly the forward's inputs; the Trainer must not drop pixel_values.
    targs.remove_unused_columns = False
    set_seed(targs.seed)  # before the build: new weights (P_d, <voco>, --tiny, LoRA) are reproducible
    model, processor = _build(margs, dargs)
    _set_trainable(model, margs)
    dataset = LLaVADataset(dargs.data_path, processor, dargs.image_folder, dargs.system_prompt)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=DataCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    model = trainer.model
    if margs.llm == "lora":
        _merge_lora(model)  # assumes unsharded parameters (DDP, ZeRO-1/2), not ZeRO-3/FSDP
    trainer.save_model(targs.output_dir)  # the processor too (processing_class)
    return trainer


@torch.no_grad()
def answer_accuracy(
    model, processor, data_path: str, image_folder: str | None = None, system: str = "", batch_size: int = 32
) -> float:
    """The fraction of a LLaVA-format file's records whose greedy answer to the first question begins
    with the first reference answer, token for token (a prefix match: what the model writes after the
    reference's tokens, an end of sequence or more, is not checked; batched, left-padded prompts)."""
    dataset = LLaVADataset(data_path, processor, image_folder, system)
    tokenizer, pad = processor.tokenizer, processor.tokenizer.pad_token_id
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = range(start, min(start + batch_size, len(dataset)))
        prompts, references = [], []
        for i in rows:
            human, gpt = dataset.records[i]["conversations"][:2]
            prompts.append(prompt_ids(tokenizer, human["value"], system))
            references.append(tokenizer(f" {gpt['value']}", add_special_tokens=False)["input_ids"])
        length = max(map(len, prompts))
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
        pixels = torch.cat([dataset[i]["pixel_values"] for i in rows])
        new = max(map(len, references))
        out = model.generate(
            ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=new, do_sample=False
        )
        answers = out[:, length:].tolist()
        correct += sum(a[: len(r)] == r for a, r in zip(answers, references))
    return correct / len(dataset)


if __name__ == "__main__":
    main()
    # Under torchrun, a rank that reaches interpreter shutdown with its gloo process group alive can
    # abort (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489), failing
    # a run that trained and saved. Only after success: destroying it mid-collective can deadlock.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
