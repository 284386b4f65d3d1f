"""The paper's architectures, registered in timm on import (``timm.create_model("conv6")``)."""
from .conv6 import Conv6
from .resnet_cifar import resnet18_cifar
from .gin import GIN, gin
from .mnist import MnistCNN, MnistMLP, mnist_cnn, mnist_mlp

__all__ = ["Conv6", "GIN", "gin", "resnet18_cifar"]
