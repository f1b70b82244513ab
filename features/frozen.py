"""Frozen pretrained extractors: a TFLite file or a TensorFlow SavedModel that maps images to a vector.

    embedder = TFLiteEmbedder("../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")
    embedder.embed(xb)   # [B, S, S, 3] uint8 RGB -> [B, D] float32, L2-normalised

A quantised TFLite model with a uint8 input takes the pixels as they are (its input quantisation is the
model's preprocessing: for MobileNet, scale 1/128 and zero point 128 map 0..255 to [-1, 1)); an int8 model gets
the ``preprocessing`` given, quantised with its input scale and zero point; a float model gets the
``preprocessing`` given (keras.applications' modes). A SavedModel with a uint8 input gets the pixels. Outputs are dequantised, flattened and
L2-normalised. Nothing here downloads anything.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings

import numpy as np

from features.base import l2_normalize
from features.model_ops import check_tflite, load_saved_model
from features.preprocessing import preprocess
from pipeline.errors import CairnError
from pipeline.fs import local_path
from pipeline.resources import quiet_native_start_up

log = logging.getLogger(__name__)
TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier of TFLite models, at bytes 4..8


def read_tflite(path: str) -> bytes:
    """The bytes of the TFLite model at local ``path``, checked to be a flatbuffer with TFLite's identifier and
    a root table inside the file; CairnError naming the file otherwise. The interpreter then verifies the whole
    flatbuffer (it does so for a model given as bytes, not for one given as a path, whose truncated copy it reads
    past the end of: a segmentation fault)."""
    with open(path, "rb") as f:
        content = f.read()
    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise CairnError(f"{path} is not a TFLite model (no {TFLITE_IDENTIFIER.decode()} identifier at bytes 4..8); "
                         "give a .tflite file")
    root = struct.unpack_from("<I", content, 0)[0]
    if not 8 <= root <= len(content) - 4:
        raise CairnError(f"{path}: its root table starts at byte {root:,}, outside the {len(content):,}-byte file: "
                         "the file is truncated or damaged; copy it again")
    return content


def tflite_interpreter(path: str, threads: int | None = None):
    """A TFLite interpreter for ``path``: LiteRT's (ai_edge_litert) when installed, else TensorFlow's (its
    start-up lines on stderr dropped: pipeline.resources.quiet_native_start_up)."""
    with quiet_native_start_up():
        return _interpreter(path, threads)


def _interpreter(path: str, threads: int | None):
    path = local_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TFLite model not found: {path}")
    check_tflite(path)  # TensorFlow ops in it are held to the SavedModel allow-list
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    content = read_tflite(path)
    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice, once per worker
        warnings.simplefilter("ignore")
        try:  # from the bytes, which the interpreter verifies (not from the path, which it trusts)
            interpreter = Interpreter(model_content=content, num_threads=threads)
        except ValueError as e:
            raise CairnError(f"{path}: not a valid TFLite model ({e}): the file is truncated or damaged; copy it "
                             "again") from None
    try:
        interpreter.allocate_tensors()
    except RuntimeError as e:
        raise CairnError(f"{path}: the TFLite model cannot run ({e})") from None
    return interpreter


class TFLiteEmbedder:
    """A TFLite model with one image input [1, S, S, 3] and one output (any shape, flattened per image)."""

    def __init__(self, path: str, preprocessing: str = "tf", threads: int | None = None):
        self.path = path
        self.interpreter = tflite_interpreter(path, threads)
        inp = self.interpreter.get_input_details()
        out = self.interpreter.get_output_details()
        if len(inp) != 1 or len(inp[0]["shape"]) != 4 or inp[0]["shape"][-1] != 3:
            raise ValueError(f"{path}: expected one image input [1, S, S, 3], got "
                             f"{[list(d['shape']) for d in inp]}")
        self.input = inp[0]
        self.output = out[0]
        self.input_size = int(self.input["shape"][1])
        self.dim = int(np.prod(self.output["shape"][1:]))
        self.quantized_input = self.input["dtype"] == np.uint8
        self.preprocessing = "quantized-input" if self.quantized_input else preprocessing
        self._batch = 1
        self._lock = threading.Lock()

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            shape = [batch, self.input_size, self.input_size, 3]
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = batch

    def _input(self, xb: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.input["dtype"])
        if self.quantized_input:  # uint8 image models take the pixels (their input quantisation normalises)
            return xb.astype(np.uint8)
        x = preprocess(xb, self.preprocessing)
        scale, zero = self.input["quantization"]
        if np.issubdtype(dtype, np.integer) and scale:  # int8 models: quantise the normalised input
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x.astype(dtype)

    def embed(self, xb: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8 RGB -> [B, D] float32, L2-normalised (S is the model's input size)."""
        if xb.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"{os.path.basename(self.path)} takes {self.input_size}x{self.input_size} images, "
                             f"not {xb.shape[1]}x{xb.shape[2]}")
        with self._lock:  # one interpreter per model; Beam may call it from several threads of a worker
            self._resize(len(xb))
            self.interpreter.set_tensor(self.input["index"], self._input(xb))
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"]).reshape(len(xb), -1).astype(np.float32)
        scale, zero = self.output["quantization"]
        if scale:
            y = (y - zero) * scale
        return l2_normalize(y)

    def metadata(self) -> dict:
        return {"format": "tflite", "input_size": self.input_size, "dim": self.dim,
                "preprocessing": self.preprocessing, "input_dtype": np.dtype(self.input["dtype"]).name}


class SavedModelEmbedder:
    """A TensorFlow SavedModel whose serving signature maps float images [B, S, S, 3] to [B, ...]; one whose graph
    holds file, process, network or Python ops is refused before loading (features/model_ops.py)."""

    def __init__(self, path: str, input_size: int = 224, preprocessing: str = "tf", signature: str = "serving_default"):
        import tensorflow as tf

        self.path = path
        self.model = load_saved_model(path)  # refused unless its graph holds pure tensor ops only
        if signature not in self.model.signatures:
            raise ValueError(f"{path} has no signature {signature!r}; it has {sorted(self.model.signatures)}")
        self.fn = self.model.signatures[signature]
        (self.input_name, spec), = self.fn.structured_input_signature[1].items()
        shape = spec.shape.as_list()
        self.input_size = int(shape[1]) if shape[1] else int(input_size)
        self.input_dtype = spec.dtype
        self.preprocessing = "pixels" if spec.dtype == tf.uint8 else preprocessing
        outputs = sorted(self.fn.structured_outputs)
        if len(outputs) == 1:
            self.output_name = outputs[0]
        else:
            named = [o for o in outputs if o in self.OUTPUT_NAMES]
            if not named:
                raise ValueError(f"{path}: the signature has several outputs {outputs}; none is one of "
                                 f"{self.OUTPUT_NAMES}, so which is the embedding is unclear")
            self.output_name = named[0]
        self.dim = int(self.embed(np.zeros((1, self.input_size, self.input_size, 3), np.uint8)).shape[1])

    OUTPUT_NAMES = ("embedding", "global_descriptor", "embeddings", "features", "output_0")

    def embed(self, xb: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        x = xb if self.preprocessing == "pixels" else preprocess(xb, self.preprocessing)
        y = self.fn(**{self.input_name: tf.cast(x, self.input_dtype)})[self.output_name].numpy()
        return l2_normalize(y.reshape(len(xb), -1))

    def metadata(self) -> dict:
        return {"format": "saved_model", "input_size": self.input_size, "dim": self.dim,
                "preprocessing": self.preprocessing, "output": self.output_name}
