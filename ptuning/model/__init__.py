"""The language model behind the backbone seam, the prompt encoders, and the metrics."""
