"""Model cards in markdown, generated from the registry like the TF-Hub pages."""

from __future__ import annotations

from imvec.registry import Card

__all__ = ["render_card"]


def render_card(card: Card) -> str:
    h, w = card.input_size
    size = f"{h}x{w}" + (" by default; other sizes (at least 32x32) work too"
                         if card.variable_input_size else " (fixed)")
    output = (f"a feature vector of {card.num_features} floats per image"
              if card.variant == "feature_vector" else
              "1001 logits per image (index 0 = background, then the ImageNet classes)")
    bn_sig = [s for s in card.signatures if s.endswith("_with_bn_hparams")]
    stats = "\n".join(f"| {k} | {v} |" for k, v in card.stats.items())
    mirrors = "\n".join(f"- `{m.kind}`: {m.url}" + (f" (sha256 {m.sha256})" if m.sha256 else "")
                        for m in card.mirrors)
    momentum = (
        f"\nThe BN momentum (TF decay) defaults to 0.99; set it per call with signature "
        f"`{bn_sig[0]}`:\n\n```python\nout = module(inputs=dict(images=images, "
        f"batch_norm_momentum=0.997), signature=\"{bn_sig[0]}\")\n```\n" if bn_sig else "")
    return f"""# {card.handle}

{card.dataset} {card.variant.replace('_', ' ')} with {card.architecture}.

- short name: `{card.alias or card.short_name}`
- network: `{card.network}` {dict(card.hparams) or ''}
- signatures: {', '.join(f'`{s}`' for s in card.signatures)}
- fine-tunable: {'yes' if card.fine_tunable else 'no'}; license: {card.license}

## Overview

{card.architecture}, as in the original TensorFlow code, re-implemented in PyTorch so that
the original checkpoint gives TensorFlow's outputs to float32 rounding.
Paper: {card.paper}

| metric | value |
|---|---|
{stats}

## Usage

```python
import imvec
module = imvec.load("{card.handle}")
height, width = imvec.get_expected_image_size(module)
outputs = module(images)  # images: [B, {h}, {w}, 3] float32 in [0, 1]
```

## Input and output

Input: RGB images `[batch, height, width, 3]`, float32 in [0, 1], {size}.
The module maps them to [-1, 1] itself. Output: {output}.

## Fine-tuning

`imvec.load(handle, trainable=True, tags={{"train"}})` gives the training graph: batch norm
on batch statistics with moving averages updated, dropout, and drop path at its final
(maximal) rate. Without `tags`, a trainable module keeps BN in inference mode.
{momentum}
## Source

Checkpoint: `{card.source_checkpoint}`. Weights come from:

{mirrors}
"""
