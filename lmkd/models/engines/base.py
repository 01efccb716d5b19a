"""What the engines that are not PyTorch share: the HF config an export carries, and :class:`Engine`,
the ``torch.nn.Module`` shell that :mod:`lmkd.models.generation` runs like an HF model."""

from __future__ import annotations

import os

import torch

from lmkd.models.engines.formats import HF_DIR


def hf_config(path: str):
    """The source model's HF config that an export carries in ``hf/``.

    Args:
        path: an export directory.

    Returns:
        The ``transformers`` config read from ``path/hf``, or None where there is none (a
        CTranslate2 directory not written by lmkd).
    """
    from transformers import AutoConfig

    hf = os.path.join(path, HF_DIR)
    if not os.path.isfile(os.path.join(hf, "config.json")):
        return None
    return AutoConfig.from_pretrained(hf)


class Engine(torch.nn.Module):
    """What :mod:`lmkd.models.generation` and :mod:`lmkd.models.truncation` ask of a model: ``config``, a
    device (one empty tensor), ``eval()``.

    The engine (a CTranslate2 translator or generator, an ONNX Runtime session) is made on first use
    (a subclass's ``_open``) and can be released with :meth:`close`: measured on this 2-core CPU, while
    a CTranslate2 translator that has run exists, a PyTorch model in the same process decodes 1.4-2x
    slower per token (even on one thread; deleting the translator restores it, unloading its weights
    does not), so :func:`lmkd.scoring.timing.measure_speed` closes an engine after each of its turns.

    Args:
        config: the model's HF config (or a stand-in with the fields lmkd reads).
        device: where the inputs go (:attr:`device`).
    """

    def __init__(self, config, device: torch.device):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self._engine = None

    @property
    def engine(self):
        """The engine object, made on first use (again after :meth:`close`)."""
        if self._engine is None:
            self._engine = self._open()
        return self._engine

    def _open(self):
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (and its threads); the next call makes it again.

        Returns:
            None.
        """
        self._engine = None

    @property
    def device(self) -> torch.device:
        """Where inputs go (``model(**batch.to(model.device))``, as for an HF model)."""
        return self.anchor.device
