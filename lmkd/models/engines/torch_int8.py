"""The ``torch-int8`` format: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (int8
weights, activations quantised on the fly; CPU only), saved as its state dict and read back."""

from __future__ import annotations

import os

import torch

from lmkd.models.engines.base import hf_config
from lmkd.models.engines.formats import HF_DIR, WEIGHTS
from lmkd.models.loading import AUTO_CLASS


def quantize_int8(model):
    """``model`` with every ``nn.Linear`` replaced by its dynamically quantised int8 form (CPU).

    GPT-2's ``Conv1D`` layers (a linear layer with its weight stored transposed) become ``nn.Linear``
    first, or only its LM head would be quantised; ``model`` itself is left as it was.

    Args:
        model: a PyTorch (HF) model; it is moved to CPU and put in eval mode.

    Returns:
        The quantised model (a copy; ``model`` keeps its float layers).
    """
    import copy

    from torch.ao.quantization import quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    model = model.to("cpu").eval()
    if any(isinstance(m, Conv1D) for m in model.modules()):
        model = copy.deepcopy(model)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    linear = torch.nn.Linear(child.nx, child.nf)
                    with torch.no_grad():
                        linear.weight.copy_(child.weight.t())
                        linear.bias.copy_(child.bias)
                    setattr(parent, name, linear)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_torch_int8(path: str, kind: str):
    """A ``torch-int8`` export read back: the model built from its HF config, quantised the same way,
    then given the saved int8 state dict (and the generation config, where the export has one).

    Args:
        path: the export directory.
        kind: the model kind (a key of :data:`lmkd.models.loading.AUTO_CLASS`).

    Returns:
        The int8 PyTorch model, in eval mode, on CPU.
    """
    config = hf_config(path)
    model = AUTO_CLASS[kind].from_config(config).eval()
    model = quantize_int8(model)
    state = torch.load(
        os.path.join(path, WEIGHTS["torch-int8"]), map_location="cpu", weights_only=False
    )
    model.load_state_dict(state)
    if os.path.isfile(os.path.join(path, HF_DIR, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(os.path.join(path, HF_DIR))
    return model
