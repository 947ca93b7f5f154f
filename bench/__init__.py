"""archbench: data, training, the ablation runner, kernel timing, results, analysis and reports."""
