"""Overrides that shrink an experiment to seconds on a CPU, shared by the tests that train."""

TINY_UNET = ["model.unet.channels=[8,16,32]", "model.unet.strides=[2,2]", "trainer.enable_progress_bar=false"]
# a 32-voxel patch at 3 mm, global batch 2 (the blob dataset's volumes fit whole)
SMALL_RUN = ["data.patch_size=[32,32,32]", "data.spacing_mm=[3,3,3]", "data.batch_size=2", *TINY_UNET]
# a 16-voxel patch at 6 mm, no sanity validation: the fastest run that still trains and validates
FAST_RUN = [
    "data.patch_size=[16,16,16]",
    "data.spacing_mm=[6,6,6]",
    "data.batch_size=2",
    *TINY_UNET,
    "trainer.num_sanity_val_steps=0",
]
