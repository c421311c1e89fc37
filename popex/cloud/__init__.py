"""The cloud tier: finishes the inference that an edge offloads."""
