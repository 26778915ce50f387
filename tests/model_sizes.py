"""Small but real sizes of every registered model, for the tests that run the whole registry.

(model kwargs, input size): every model at 32 px with its smallest depths: ViTs of 3 blocks with
the last 2 MoE, ConvNeXts of one block per stage (blocks 1 and 3 MoE), the CIFAR CNNs narrow.
"""

SMALL = {
    "vit_moe_tiny_patch4_32": ({"depth": 3, "placement": "tail-2"}, 32),
    "vit_moe_small_patch4_32": ({"depth": 3, "placement": "tail-2"}, 32),
    "vit_moe_small_patch16_224": ({"depth": 3, "placement": "tail-2", "img_size": 32}, 32),
    "vit_moe_base_patch16_224": ({"depth": 3, "placement": "tail-2", "img_size": 32}, 32),
    "convnext_moe_atto": ({"depths": (1, 1, 1, 1)}, 32),
    "convnext_moe_femto": ({"depths": (1, 1, 1, 1)}, 32),
    "convnext_moe_pico": ({"depths": (1, 1, 1, 1)}, 32),
    "convnext_moe_nano": ({"depths": (1, 1, 1, 1)}, 32),
    "convnext_moe_tiny": ({"depths": (1, 1, 1, 1)}, 32),
    "cnn_resnet_cifar": ({"width": 8}, 32),
    "cnn_resnet_cifar_moe": ({"width": 8}, 32),
    "cnn_dw_cifar": ({"width": 8}, 32),
    "cnn_dw_cifar_moe": ({"width": 8}, 32),
    "cnn_resnet_cifar_head": ({"width": 8, "head_hidden": 16}, 32),
    "cifar_airbench": ({"widths": (16, 32, 32)}, 32),
    "cifar_airbench_moe": ({"widths": (16, 32, 32)}, 32),
    "resnet18_cifar_dense_head": ({"width": 8}, 32),
    "resnet18_cifar_mixture_head": ({"width": 8}, 32),
    "resnet18_cifar_sparse_head": ({"width": 8}, 32),
    "resnet18_cifar_soft_head": ({"width": 8}, 32),
}
