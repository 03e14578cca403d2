"""The model in plain PyTorch (imports torch only): hyper-parameters (args), MLA, RoPE, the router table,
DeepSeekMoE, MTP, the Transformer, sampling. Speed paths sit in ``fast/`` behind named hooks with the plain
formula in each module as their reference; kernels and parallelism come in through other hooks
(``Linear.impl``, ``GroupedExperts.gmm``, ``MoE.dispatcher``): see ARCHITECTURE.md."""
