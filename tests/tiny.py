"""Config overrides the tests share: tiny random encoders and a problem that runs in seconds on a CPU."""

TINY_ENCODERS = ["encoders.image.name=tiny", "encoders.image.weights=random", "encoders.image.image_size=32",
                 "encoders.text.name=tiny", "encoders.text.weights=random", "encoders.num_workers=0",
                 "run.progress=false"]
TINY_PROBLEM = ["model.embed_dim=16", "buffer.num_experts=2", "buffer.train_epochs=3", "buffer.batch_size=16",
                "distill.num_queries=8", "distill.sim_rank=2", "distill.mini_batch_size=4", "distill.syn_steps=3"]
# outer lrs under which the toy problem does not diverge
STABLE_LRS = ["distill.lr_img=0.1", "distill.lr_txt=0.1", "distill.lr_sim=0.01", "distill.lr_lr=1e-4"]
