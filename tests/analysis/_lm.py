"""Tiny language models and token batches shared by the layout and language-model tests
(random init from configs; nothing is downloaded)."""

import argparse

import pytest
import torch
import torch.nn.functional as F

VOCAB, SEQ = 50, 8


def gpt2(seed: int = 0) -> torch.nn.Module:
    """A one-layer GPT-2 whose ``lm_head.weight`` is tied to ``transformer.wte.weight``."""
    transformers = pytest.importorskip("transformers", reason="the GPT-2 tests build one")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed: int = 0) -> torch.nn.Module:
    """A one-layer BertForMaskedLM whose decoder is tied to the word embeddings."""
    transformers = pytest.importorskip("transformers", reason="the BERT test builds one")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg).eval()


def token_batches() -> list:
    """Two dict batches ``({"input_ids": ids}, ids)``: the causal-LM convention."""
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (n, SEQ), generator=g) for n in (3, 2)]
    return [({"input_ids": x}, x) for x in ids]


def save_pretrained_folders(root, steps=(100, 2, 10)):
    """``root/gpt2-stepN/`` written by ``save_pretrained`` (no ``lm_head.weight`` inside)."""
    for s in steps:
        gpt2(seed=s).save_pretrained(root / f"gpt2-step{s}")
    return root


def trainer_folders(root, steps=(20, 5, 100)):
    """``root/checkpoint-N/`` as the Hugging Face Trainer writes them: the weights (one as
    ``pytorch_model.bin``, one sharded), optimizer, scheduler, RNG and trainer state."""
    for i, s in enumerate(steps):
        model, folder = gpt2(seed=s), root / f"checkpoint-{s}"
        model.save_pretrained(folder, max_shard_size="8KB" if i == 2 else "1GB")
        if i == 1:  # the older format: a pickle, the tied head left out as well
            (folder / "model.safetensors").unlink()
            sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
            torch.save(sd, folder / "pytorch_model.bin")
        opt = torch.optim.AdamW(model.parameters())
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save({"last_epoch": s}, folder / "scheduler.pt")
        torch.save({"python": 1, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
        (folder / "trainer_state.json").write_text(f'{{"global_step": {s}, "epoch": 0.5}}')
    return root


def timm_files(root, make, epochs=(10, 1, 2)):
    """timm's ``checkpoint-N.pth.tar``: the state dict beside an ``argparse.Namespace``."""
    root.mkdir(parents=True, exist_ok=True)
    for e in epochs:
        torch.manual_seed(e)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        args = argparse.Namespace(model="tiny", lr=0.1, epochs=300, sched="cosine", mean=[0.5])
        blob = {"epoch": e, "arch": "tiny", "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(), "args": args, "version": 2}  # fmt: skip
        torch.save(blob, root / f"checkpoint-{e}.pth.tar")
    return root


def lm_loss(model, batches) -> float:
    """The oracle: next-token cross-entropy over every token of every batch at once."""
    with torch.no_grad():
        z = [model(**x).logits[:, :-1].reshape(-1, VOCAB) for x, _ in batches]
        y = [y[:, 1:].reshape(-1) for _, y in batches]
    return float(F.cross_entropy(torch.cat(z), torch.cat(y), ignore_index=-100))
