"""The toy world: a procedural world whose every picture's content is known (`world`), the Stable Diffusion
pretrained on it and shipped with the package (`model`: `builtin:toy-sd`; `pretrain` made it), its judge
(`judge`), and the proof that the finetuning methods learn there (`learning`). See docs/toy_world.md."""
