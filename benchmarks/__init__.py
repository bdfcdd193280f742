"""Side-by-side benchmarks against the reference implementations (diffusers), reported as ratios."""
