"""Layer-wise reconstruction from calibration data (SparseGPT, Wanda, GPTQ)."""
