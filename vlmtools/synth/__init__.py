"""The offline world: a procedural benchmark with known truth, and the micro CLIP trained on it.

    from vlmtools.synth import make_world, sample_batch, evaluate_world
    make_world("world", classes=20, per_class=50, domain="photo", seed=0)

Library API (numpy only at import; torch is imported by the evaluation functions when called):
  make_world(out_dir, ...)             write a world directory (see vlmtools.synth.make)
  load_world(dir), read_attributes(dir)   read back world.json / the true attributes per image id
  make_classes(n, seed)                made-up class definitions (attribute distributions)
  oracle_descriptors(cls)              (descriptors, kinds) written from a class definition
  class_captions(cls)                  caption sentences for a class
  sample_class_images(rng, classes, per_class, domain, image_size)   in-memory images of given classes
  sample_batch(rng, n, image_size, domain, hard_negatives)           uniform random images, for training
  caption(rng, attrs)                  one varied training caption for an image's attributes
  render(rng, attrs, size)             one image and its exact mask
  evaluate_world(encoder, ...)         zero-shot attribute, class-name and oracle-descriptor accuracy
"""

from vlmtools.synth.evaluate import (attribute_accuracy, class_name_accuracy, descriptor_accuracy,
                                     encode_images, evaluate_world)
from vlmtools.synth.make import load_world, make_world, read_attributes
from vlmtools.synth.render import render
from vlmtools.synth.world import (VOCAB, WORLD_VERSION, caption, class_captions, make_classes,
                                  oracle_descriptors, sample_attributes, sample_batch, sample_class_images)

__all__ = ["VOCAB", "WORLD_VERSION", "attribute_accuracy", "caption", "class_captions", "class_name_accuracy",
           "descriptor_accuracy", "encode_images", "evaluate_world", "load_world", "make_classes", "make_world",
           "oracle_descriptors", "read_attributes", "render", "sample_attributes", "sample_batch", "sample_class_images"]
