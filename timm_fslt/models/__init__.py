"""The paper's architectures, registered in timm on import (``timm.create_model("conv6")``)."""
from timm_fslt.models.conv6 import Conv6
from timm_fslt.models.resnet_cifar import resnet18_cifar
from timm_fslt.models.gin import GIN, gin
from timm_fslt.models.mnist import MnistCNN, MnistMLP, mnist_cnn, mnist_mlp

__all__ = ["Conv6", "GIN", "gin", "resnet18_cifar"]
