"""Loading models and tokenizers from a hub id or a local directory (the same code path).

Weights load from safetensors only (``use_safetensors=True``): a pickled ``pytorch_model.bin``
runs whatever code it carries when unpickled. Model code from a hub repo runs only when the
config says ``base_model.trust_remote_code: true``; every loader here defaults it to False.
"""

from __future__ import annotations

from pathlib import Path


def chat_template_text(template: str) -> str:
    """A chat template setting as Jinja text: a path to a ``.jinja`` file is read, a template
    string is returned as it is. Anything without a ``{`` is taken for a path: such a
    "template" could not render a single message, only print itself."""
    if "{" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise FileNotFoundError(f"chat template file {template} not found (a chat template is "
                                f"a Jinja string or a path to a .jinja file)")
    return path.read_text(encoding="utf-8")


class UnsafeWeights(ValueError):
    """A model directory with pickled weights only (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)."""


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def unsafe_weights(path: str) -> str | None:
    """Why the local model directory ``path`` cannot be loaded (None if it can, or if ``path``
    is not a local directory, i.e. a hub id, which ``use_safetensors=True`` guards)."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return None
    pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLED)
    if not pickled:
        return None  # no weights at all: transformers says so itself
    return (f"{path}: weights only in pickle format ({', '.join(pickled)}), refused: unpickling "
            f"runs code. Convert once where you trust the file, e.g. "
            f"AutoModel.from_pretrained(dir).save_pretrained(dir) writes model.safetensors")


def _check_weights(path: str) -> None:
    if why := unsafe_weights(path):
        raise UnsafeWeights(why)


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """Tokenizer with a pad token and left padding (generation needs prompts right-aligned);
    ``chat_template`` (Jinja text or a ``.jinja`` path) replaces the tokenizer's own, if any."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tok.chat_template = chat_template_text(chat_template)
    if tok.pad_token is None:
        # Many causal LMs ship without a pad token; EOS is the usual stand-in. Masks, not the
        # pad id, decide what counts everywhere in this codebase, so this is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def fast_activation(path: str, revision: str | None = None, trust_remote_code: bool = False
                    ) -> dict[str, str]:
    """Config override swapping GPT-2's ``gelu_new`` for ``gelu_pytorch_tanh``.

    Both are the tanh approximation of GELU (same formula), but ``gelu_new`` runs as ~8
    elementwise kernels forward and more backward, where PyTorch's is one: 16% of a PPO update
    on the demo model went there. Other activations are left alone.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return {key: "gelu_pytorch_tanh" for key in ("activation_function", "hidden_act")
            if getattr(config, key, None) == "gelu_new"}


# PyTorch's fused attention (flash / memory-efficient kernels on a GPU). transformers 5 picks
# it by default where a model supports it; named here so a default change upstream, or a
# model that would fall back to eager attention, fails loudly instead of running slowly.
ATTN_IMPLEMENTATION = "sdpa"


def load_causal_lm(path: str, revision: str | None = None, trust_remote_code: bool = False,
                   dtype=None):
    from transformers import AutoModelForCausalLM

    _check_weights(path)
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
        use_safetensors=True, attn_implementation=ATTN_IMPLEMENTATION,
        **fast_activation(path, revision, trust_remote_code))


def load_sequence_scorer(path: str, revision: str | None = None, trust_remote_code: bool = False,
                         dtype=None):
    """A model with a scalar head (reward model or critic): num_labels=1."""
    from transformers import AutoModelForSequenceClassification

    _check_weights(path)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
        use_safetensors=True, attn_implementation=ATTN_IMPLEMENTATION,
        **fast_activation(path, revision, trust_remote_code))


def transformer_blocks(model):
    """The model's stack of transformer blocks: the ModuleList of num_hidden_layers modules."""
    import torch

    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n} transformer blocks found")


def freeze_bottom_layers(model, n: int) -> None:
    """Freeze the input embeddings and the first ``n`` blocks (0 leaves everything trainable).

    The lower layers of a pretrained LM change least in fine-tuning; freezing them saves
    their gradients and optimizer state (Huang et al. 2024 list it among memory savers).
    """
    if n <= 0:
        return
    model.get_input_embeddings().requires_grad_(False)
    for block in list(transformer_blocks(model))[:n]:
        block.requires_grad_(False)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (transformers' own mechanism; it acts in train mode only, so sampling and scoring
    under ``no_grad`` are untouched). Non-reentrant checkpointing: no input needs
    ``requires_grad``, so frozen embeddings and LoRA bases work as they are."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (Huang et al. 2024: dropout makes the PPO ratio
    differ from 1 on identical weights, and the log-probs of rollout and update disagree)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def upcast_trainable(model) -> None:
    """Trained parameters to fp32 (master weights) on a model whose frozen base is bf16.

    peft already keeps LoRA adapters in fp32 (``autocast_adapter_dtype``), but a
    ``modules_to_save`` copy (the critic's ``score`` head) keeps its base's dtype: bf16 weights
    would swallow updates smaller than 2**-8 of the weight. Under CUDA autocast the matmuls
    still run in bf16.
    """
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
