"""Models written once against a Keras-like library ``lib`` (``keras`` or ``gpucnn``), so that Keras and gpucnn
build the very same graph in the tests that compare them."""


def residual_block(lib, shape=(8, 8, 3), filters=4, classes=3, frozen=()):
    """Conv2D → BatchNormalization → ReLU → SeparableConv2D (no bias) → BatchNormalization, added to the Conv2D's output
    (the residual), → GlobalAveragePooling2D → Dense(softmax). ``frozen``: names of layers made non-trainable."""
    L = lib.layers
    inputs = lib.Input(shape=shape)
    x = L.Conv2D(filters, 3, padding="same", name="conv")(inputs)
    y = L.BatchNormalization(name="bn_1")(x)
    y = L.ReLU(name="relu")(y)
    # no bias before a BatchNormalization (its gradient is zero there: Adam would step on rounding noise)
    y = L.SeparableConv2D(filters, 3, padding="same", depth_multiplier=2, use_bias=False, name="separable")(y)
    y = L.BatchNormalization(name="bn_2")(y)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = lib.Model(inputs, L.Dense(classes, activation="softmax", name="dense")(x))
    for name in frozen:
        model.get_layer(name).trainable = False
    return model


def xception_like(lib, shape=(180, 180, 3), sizes=(32, 64, 128, 256, 512), head="sigmoid"):
    """Deep Learning with Python, 2nd ed., ch. 9: the mini-Xception for cats vs dogs, with a plain Input instead
    of its augmentation and Rescaling layers. ``head="softmax"``: Dense(2, softmax) instead of Dense(1, sigmoid)."""
    L = lib.layers
    inputs = lib.Input(shape=shape)
    x = L.Conv2D(filters=32, kernel_size=5, use_bias=False)(inputs)
    for size in sizes:
        residual = x
        x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
        x = L.SeparableConv2D(size, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.Activation("relu")(x)
        x = L.SeparableConv2D(size, 3, padding="same", use_bias=False)(x)
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = L.Conv2D(size, 1, strides=2, padding="same", use_bias=False)(residual)
        x = L.add([x, residual])
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.5)(x)
    outputs = L.Dense(1, activation="sigmoid")(x) if head == "sigmoid" else L.Dense(2, activation="softmax")(x)
    return lib.Model(inputs=inputs, outputs=outputs)
