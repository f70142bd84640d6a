"""The network (timm backbone split into a frozen prefix and a trainable rest, coordinate fusion,
head), its feature cache, neighbour descriptors, loss, target transforms and checkpoints."""
