"""Demo and research code around the library, outside its import graph.

digits          scikit-learn's digits, the digit classifier and sample-quality metrics
train_digits    trains the bundled digits DDPM, draft UNet and classifier
train_mdm       trains the bundled masked-diffusion digits model and its drafter
bench           benchmarks (``specdiff bench``), results and plots in ``assets/bench/``
bench_discrete  the masked-diffusion benchmark
"""
