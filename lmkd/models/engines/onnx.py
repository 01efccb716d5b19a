"""The ``onnx`` / ``onnx-int8`` formats: ``torch.onnx.export`` of a sequence classifier, run by ONNX
Runtime; ``onnx-int8`` is ORT's dynamic int8 quantisation of it."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from lmkd.models.engines.base import Engine, hf_config
from lmkd.models.engines.formats import WEIGHTS


def export_onnx(model, tokenizer, out: str, int8: bool, sample_text: str) -> None:
    """Write a sequence classifier as ONNX (``model.onnx``), its logits the one output.

    Args:
        model: the PyTorch sequence classifier.
        tokenizer: its tokenizer; it encodes the sample inputs the export traces.
        out: the export directory (it exists).
        int8: quantise the weights to int8 with ONNX Runtime's dynamic quantisation (the float32
            file is written first, then removed).
        sample_text: the text of the sample inputs (two rows of different lengths: batch and
            tokens are dynamic axes).

    Returns:
        None.
    """
    enc = tokenizer(
        [sample_text, sample_text + " " + sample_text], return_tensors="pt", padding=True
    )
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    path = os.path.join(out, WEIGHTS["onnxruntime"])
    fp32 = path if not int8 else os.path.join(out, "model_fp32.onnx")

    class _Logits(torch.nn.Module):  # a tensor out, not a ModelOutput
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).logits

    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model),
            tuple(enc[n] for n in names),
            fp32,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            dynamo=False,
        )
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" notice
        try:
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(level)
        os.remove(fp32)


class OrtClassifier(Engine):
    """An ONNX Runtime session of a sequence classifier, called like the HF model (``.logits``).

    The session runs on CPU with the threads PyTorch gets; it opens at once, so an export that
    cannot be loaded says so here.

    Args:
        path: the export directory.
    """

    def __init__(self, path: str):
        super().__init__(hf_config(path), torch.device("cpu"))
        self.path = path
        self._engine = self._open()
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _open(self):
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(
            os.path.join(self.path, WEIGHTS["onnxruntime"]),
            opts,
            providers=["CPUExecutionProvider"],
        )

    @property
    def session(self):
        """The ``onnxruntime.InferenceSession`` (made again after :meth:`close`)."""
        return self.engine

    def forward(self, **batch):
        """The classifier's logits on a tokenised batch.

        Args:
            **batch: the tokenizer's tensors; those the ONNX graph takes (``input_ids``,
                ``attention_mask``, ``token_type_ids``) are fed, the rest ignored.

        Returns:
            A namespace with ``.logits`` ``[batch, labels]`` (a CPU tensor).
        """
        feed = {n: batch[n].cpu().numpy() for n in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))
