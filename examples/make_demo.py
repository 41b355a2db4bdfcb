"""Make a small demo collection and demo weights for `imvec extract`, offline.

Writes DIR/images/ (40 JPEG/PNG images in sub-folders, plus one broken file to show the
errors report) and DIR/nasnet_mobile_small.safetensors: the reference checkpoint of
tests/fixtures/nasnet_mobile_small, derived value for value by imvec.demo (so an installed
wheel makes it too: `imvec demo DIR`). Those are NOT ImageNet weights: the original
TF-Slim NASNet-A mobile code at a reduced size (3 cells, 12 filters) with deterministic
random weights, so the vectors are exactly what TensorFlow computes for that checkpoint
but carry no semantic meaning. With internet access use `--model nasnet_mobile` instead
(real weights, downloaded and converted on first use).

    python examples/make_demo.py [DIR]     (default DIR: demo)
"""

from __future__ import annotations

import sys

from imvec.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
