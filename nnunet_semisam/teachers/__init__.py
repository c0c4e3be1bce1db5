"""Teachers: MedSAM / MedSAM2 wrappers, prompts, Algorithm 2 and pseudo-label storage (METHODS.md §2, §4.5, §5.4).

Modules (import what you need; nothing heavy is imported here):
- `medsam`: `MedSAMTeacher` (exact MedSAM reference inference, feature taps, fast path), `medsam_preprocess`.
- `sam_models`: SAM builders and checkpoint loading, the embedded stand-in teacher (`embedded_teacher_checkpoint`).
- `prompts`: boxes and points from masks. `uint8_adapter`: rule U (`to_uint8`). `cache`: embedding cache.
- `algorithm2`: Semi-SAM+ Algorithm 2 over a teacher interface; `MedSAMSliceTeacher`.
- `pseudolabels`: pseudo-label generation, store and loaders. `medsam2`: optional MedSAM2 teacher (needs `sam2`).
- `train_embedded`: training script of the embedded stand-in teacher.
- `ema`: EMA teacher (owned by the trainers' base).
"""
