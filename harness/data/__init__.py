"""Data layer: CoOp-layout readers, dataset checks, few-shot sampling, the demo generator, images."""
