"""Regenerate the torch-exported BERT fixtures in tests/data/ (`torch_bert_tiny*.onnx`).

These are real exporter outputs, clutter and all, for `tests/e2e/test_torch_exported.py`: the
TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) writes Shape→Gather→Unsqueeze→Concat→
Reshape chains for every `view(x.size()...)`, builds the attention mask from Range/Equal/Where/
Expand chains or from a float32-min constant, and writes LayerNorm fused (opset 17) or decomposed
(opset < 17). torch and transformers are needed here only, never by lowbit or its tests.

Generated with torch 2.13.0+cpu and transformers 5.24.0 (Python 3.11):

    pip install torch==2.13.0 transformers
    python tools/export_torch_fixtures.py [--out tests/data]

| file | model | export |
|---|---|---|
| torch_bert_tiny.onnx | transformers `BertModel`, eager attention | opset 17 |
| torch_bert_tiny_opset14.onnx | the same model | opset 14: LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div |
| torch_bert_tiny_nofold.onnx | the same model | opset 17, `do_constant_folding=False` |
| torch_bert_tiny_sdpa.onnx | the same weights, `attn_implementation="sdpa"` | opset 17 |
| torch_bert_tiny_classic.onnx | plain-torch BERT written as transformers 4.x's `BertModel` | opset 17 |
| torch_bert_tiny_classic_sdpa.onnx | the same weights, attention as 4.41+'s sdpa path | opset 17 |

The transformers model: hidden 32, 2 layers, 2 heads, intermediate 128, vocab 200, 64 positions;
inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, batch_size × sequence); outputs
`last_hidden_state` and `pooler_output`. The classic model: hidden 48, 2 layers, 4 heads (head size 12),
intermediate 192, same vocabulary and positions; inputs `input_ids` and `attention_mask` (token
types come from a buffer of zeros, expanded, as transformers 4.x does). Every parameter, biases and
LayerNorm gains included, is drawn from a seeded normal, so no two are equal (a fresh transformers
model has zero biases and unit gains, which the exporter deduplicates into Identity nodes and which
would hide a swapped gain and bias).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import onnx
import torch
import transformers
from torch import nn

VOCAB, MAX_POSITIONS = 200, 64
EXAMPLE_BATCH, EXAMPLE_SEQUENCE = 2, 16
DYNAMIC = {0: "batch_size", 1: "sequence"}


def randomize(module: nn.Module, seed: int) -> None:
    """Draw every parameter from N(0, 0.2²), gains from N(1, 0.2²), in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            values = torch.randn(parameter.shape, generator=generator) * 0.2
            is_gain = "LayerNorm.weight" in name or name.endswith("norm.weight")
            parameter.copy_(values + 1.0 if is_gain else values)


class TransformersBert(nn.Module):
    """transformers' BertModel, called with keywords (its positional order changed across versions)."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128,
                                         max_position_embeddings=MAX_POSITIONS, attn_implementation=attention)
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


class ClassicSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.head_size, self.sdpa = heads, hidden // heads, sdpa
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.head_size)).permute(0, 2, 1, 3)

    def forward(self, hidden, mask):
        query, key, value = (self.split_heads(layer(hidden)) for layer in (self.query, self.key, self.value))
        if self.sdpa:
            context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            return context.transpose(1, 2).reshape(hidden.size(0), hidden.size(1), self.heads * self.head_size)
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_size) + mask
        context = torch.matmul(nn.functional.softmax(scores, dim=-1), value).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.heads * self.head_size,))


class ClassicLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, sdpa: bool) -> None:
        super().__init__()
        self.attention = ClassicSelfAttention(hidden, heads, sdpa)
        self.attention_output, self.attention_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate, self.output = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, hidden, mask):
        hidden = self.attention_norm(self.attention_output(self.attention(hidden, mask)) + hidden)
        return self.output_norm(self.output(nn.functional.gelu(self.intermediate(hidden))) + hidden)


class ClassicBert(nn.Module):
    """transformers 4.x's BertModel in plain torch: buffered position and token-type ids sliced to the
    sequence, the extended mask `(1 - mask[:, None, None, :]) * finfo(float32).min`, view/permute by
    size(), scores divided by √head_size, erf GELU, post-LayerNorm, tanh pooler on the first token.
    With `sdpa`, as its BertSdpaSelfAttention (4.41+): the float mask expanded to [b, 1, s, s] and
    filled by masked_fill, attention by `scaled_dot_product_attention`."""

    def __init__(self, hidden: int = 48, layers: int = 2, heads: int = 4, intermediate: int = 192,
                 sdpa: bool = False) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.word_embeddings = nn.Embedding(VOCAB, hidden)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.embeddings_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(MAX_POSITIONS).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros((1, MAX_POSITIONS), dtype=torch.long), persistent=False)
        self.layers = nn.ModuleList(ClassicLayer(hidden, heads, intermediate, sdpa) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        batch, length = input_ids.size()
        token_type_ids = self.token_type_ids[:, :length].expand(batch, length)
        hidden = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                  + self.position_embeddings(self.position_ids[:, :length]))
        hidden = self.embeddings_norm(hidden)
        if self.sdpa:
            inverted = 1.0 - attention_mask[:, None, None, :].expand(batch, 1, length, length).to(torch.float32)
            mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(torch.float32).min)
        else:
            extended = attention_mask[:, None, None, :].to(torch.float32)
            mask = (1.0 - extended) * torch.finfo(torch.float32).min
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden, torch.tanh(self.pooler(hidden[:, 0]))


def example_inputs(names: list[str]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, EXAMPLE_SEQUENCE // 2:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(by_name[name] for name in names)


def export(model: nn.Module, inputs: list[str], path: Path, *, opset: int, fold: bool = True) -> None:
    model.eval()
    outputs = ["last_hidden_state", "pooler_output"]
    dynamic_axes = {name: DYNAMIC for name in [*inputs, "last_hidden_state"]} | {"pooler_output": {0: "batch_size"}}
    torch.onnx.export(model, example_inputs(inputs), str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=fold, dynamo=False)
    proto = onnx.load(str(path))
    proto.doc_string = (f"{type(model).__name__}, opset {opset}, do_constant_folding={fold}; torch "
                        f"{torch.__version__}, transformers {transformers.__version__}; tools/export_torch_fixtures.py")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    print(f"{path}: {path.stat().st_size} bytes, {len(proto.graph.node)} nodes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data")
    out = parser.parse_args(argv).out
    hf_inputs = ["input_ids", "attention_mask", "token_type_ids"]

    torch.manual_seed(0)
    eager = TransformersBert("eager")
    randomize(eager, seed=0)
    export(eager, hf_inputs, out / "torch_bert_tiny.onnx", opset=17)
    export(eager, hf_inputs, out / "torch_bert_tiny_opset14.onnx", opset=14)
    export(eager, hf_inputs, out / "torch_bert_tiny_nofold.onnx", opset=17, fold=False)
    sdpa = TransformersBert("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    export(sdpa, hf_inputs, out / "torch_bert_tiny_sdpa.onnx", opset=17)

    torch.manual_seed(0)
    classic = ClassicBert()
    randomize(classic, seed=1)
    export(classic, ["input_ids", "attention_mask"], out / "torch_bert_tiny_classic.onnx", opset=17)
    classic_sdpa = ClassicBert(sdpa=True)
    classic_sdpa.load_state_dict(classic.state_dict())
    export(classic_sdpa, ["input_ids", "attention_mask"], out / "torch_bert_tiny_classic_sdpa.onnx", opset=17)


if __name__ == "__main__":
    main()
