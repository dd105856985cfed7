"""Fused implementations of the Ultimus block: Triton (`ultimus_triton`) and C++/CUDA (`ultimus_cpp`)."""
