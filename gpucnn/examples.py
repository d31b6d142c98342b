"""The book's models and data as gpucnn's command, sweep, benchmarks and pictures use them.

``seed_model()`` is "Deep Learning with Python"'s §5.1 convnet (Sequential, 93,322 parameters);
``book_convnet()`` the 2nd/3rd editions' functional MNIST convnet (104,202 parameters); ``load_mnist()`` MNIST
prepared as the book prepares it.
"""


def seed_model(filters=(32, 64, 64), dense=64):
    """The seed model: three 3x3 ReLU convolutions with 2x2 max-pooling between them, then Dense."""
    from . import layers, models
    f1, f2, f3 = filters
    return models.Sequential([
        layers.Conv2D(f1, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(f2, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(f3, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(dense, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])


def seed_model_functional(filters=(32, 64, 64), dense=64):
    """The seed model written with the functional API (the same layers, graph and numbers)."""
    from . import layers, models
    f1, f2, f3 = filters
    inputs = layers.Input(shape=(28, 28, 1))
    x = layers.Conv2D(f1, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(f2, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(f3, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation="relu")(x)
    return models.Model(inputs, layers.Dense(10, activation="softmax")(x))


def book_convnet():
    """The 2nd/3rd editions' MNIST convnet: 32/64/128 filters, no Dense(64); 104,202 parameters."""
    from . import layers, models
    inputs = layers.Input(shape=(28, 28, 1))
    x = layers.Conv2D(filters=32, kernel_size=3, activation="relu")(inputs)
    x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Conv2D(filters=64, kernel_size=3, activation="relu")(x)
    x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Conv2D(filters=128, kernel_size=3, activation="relu")(x)
    x = layers.Flatten()(x)
    return models.Model(inputs=inputs, outputs=layers.Dense(10, activation="softmax")(x))


def load_mnist(subset=None, test_subset=None):
    """MNIST as the book prepares it: (N, 28, 28, 1) float32 in [0, 1] and one-hot labels."""
    from .datasets import mnist
    from .utils import to_categorical
    (x_train, y_train), (x_test, y_test) = mnist.load_data()
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    prep = lambda x: (x.reshape((len(x), 28, 28, 1)).astype("float32") / 255)  # noqa: E731
    return (prep(x_train), to_categorical(y_train, 10)), (prep(x_test), to_categorical(y_test, 10))
