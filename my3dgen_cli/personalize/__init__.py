"""Photos -> identity: anchors (projection), adapter training, symmetry, many people, distributed."""
