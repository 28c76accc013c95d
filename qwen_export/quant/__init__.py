"""Weight quantization: schemes, numpy reference numerics, algorithms and lazy quantized tensors."""
