// The SmallThinker runtime: model loading, kernels, the forward pass, sampling.
// It reads packages through Format and never writes them.
@_exported import Format
