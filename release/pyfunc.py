"""The policy as an MLflow pyfunc model: prompts in, completions out.

This file is logged with the model as MLflow "models from code"
(https://mlflow.org/docs/latest/model/models-from-code.html): MLflow copies it beside the
model and runs it at load, so a served model needs mlflow, torch and transformers, not this
repository. Hence it imports nothing of ours. The policy directory (safetensors + tokenizer)
is the model's artifact ``policy``; the generation settings are its ``model_config`` and also
the defaults of its signature's params, so a request may override them::

    POST /invocations {"inputs": ["The acting of this film was"],
                       "params": {"max_new_tokens": 16, "temperature": 0.7}}
    -> {"predictions": [" quite delightful."]}

Prompts are used as given (a chat model's caller renders the chat template).
"""

from __future__ import annotations

import threading

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0}


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float
             ) -> list[str]:
    """Completions of ``prompts``: greedy at ``temperature <= 0``, else sampled from the full
    softmax at that temperature (no top-k/top-p, as the policy was trained). Prompt plus
    completion stay inside the model's context window: the completion gets at most half of
    it, and a longer prompt loses its start.
    """
    import torch

    new = int(max_new_tokens)
    window = getattr(model.config, "max_position_embeddings", None)
    limits = {}
    if window:
        new = max(1, min(new, window // 2))
        limits = {"truncation": True, "max_length": window - new}
    tokenizer.truncation_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    **limits).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def load_policy(path: str):
    """(model, tokenizer) from a saved policy directory, ready for ``complete``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation needs prompts right-aligned
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Safetensors only, no repo code: a served model is a file anyone with registry write
    # access could have replaced (models.loading says why; this module imports nothing of ours).
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True,
                                                 trust_remote_code=False).to(device).eval()
    return model, tokenizer


class PolicyModel(PythonModel):
    """MLflow's wrapper around ``complete``; one request generates at a time per loaded model."""

    def load_context(self, context):
        self.model, self.tokenizer = load_policy(context.artifacts["policy"])
        self.settings = {**DEFAULTS, **(context.model_config or {})}
        self.lock = threading.Lock()  # generate() is not meant to run concurrently on a model

    # Hinted as a DataFrame, from which MLflow infers no signature: the logged one, with the
    # generation params, applies (a list[str] hint would infer one without params, and drop
    # a request's params).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        settings = {**self.settings, **(params or {})}
        with self.lock:
            return complete(self.model, self.tokenizer, _prompts(model_input),
                            int(settings["max_new_tokens"]), float(settings["temperature"]))


def _prompts(model_input) -> list[str]:
    """MLflow turns ``{"inputs": [...]}`` (or a list passed to ``predict``) into a one-column
    DataFrame against the string-column signature; a bare list or string is taken too."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, str):
        model_input = [model_input]
    return [str(p) for p in model_input]


mlflow.models.set_model(PolicyModel())
