"""The paper's published results (Gu & Lee, Bioengineering 2024), for comparison.

Columns: test loss, accuracy (%), precision (%), recall (%), F1, G-mean.
"""

COLUMNS = ("loss", "accuracy", "precision", "recall", "f1", "gmean")

TABLE_2 = {  # (arch, mode) -> values, at the base learning rate
    ("resnet18", "scratch"): (0.272, 89.6, 90.1, 93.6, 0.918, 0.894),
    ("resnet18", "transfer"): (0.168, 93.1, 91.2, 98.5, 0.947, 0.904),
    ("resnet50", "scratch"): (0.383, 83.0, 88.4, 83.8, 0.861, 0.858),
    ("resnet50", "transfer"): (0.293, 89.4, 85.7, 99.7, 0.922, 0.827),
    ("densenet161", "scratch"): (0.301, 91.2, 89.2, 97.7, 0.933, 0.885),
    ("densenet161", "transfer"): (0.162, 93.6, 91.7, 98.7, 0.951, 0.910),
    ("shufflenet_v2_x1_0", "scratch"): (0.473, 78.2, 79.8, 87.2, 0.833, 0.788),
    ("shufflenet_v2_x1_0", "transfer"): (0.354, 91.2, 91.0, 95.4, 0.931, 0.908),
    ("mobilenet_v2", "scratch"): (0.437, 80.0, 88.2, 78.5, 0.830, 0.846),
    ("mobilenet_v2", "transfer"): (0.245, 90.9, 88.1, 98.7, 0.931, 0.866),
    ("resnext50_32x4d", "scratch"): (0.426, 81.1, 88.6, 80.0, 0.841, 0.856),
    ("resnext50_32x4d", "transfer"): (0.190, 92.3, 90.9, 97.4, 0.941, 0.907),
    ("wide_resnet50_2", "scratch"): (0.290, 88.5, 90.8, 90.8, 0.908, 0.885),
    ("wide_resnet50_2", "transfer"): (0.307, 89.7, 86.1, 99.7, 0.924, 0.835),
}

TABLE_4 = {  # Inception v3
    ("inception_v3", "scratch"): (0.315, 91.2, 89.7, 97.2, 0.933, 0.892),
    ("inception_v3", "transfer"): (0.187, 93.3, 91.4, 98.5, 0.948, 0.907),
}

# Table 3 (learning rate / 10) is not published in full; the text gives transfer accuracies.
TABLE_3_TRANSFER_ACCURACY = {"resnet18": 92.6, "densenet161": 92.9, "resnext50_32x4d": 91.5}


def paper_value(arch: str, mode: str, column: str, reduced_lr: bool = False) -> float | None:
    if reduced_lr:
        if mode == "transfer" and column == "accuracy":
            return TABLE_3_TRANSFER_ACCURACY.get(arch)
        return None
    row = {**TABLE_2, **TABLE_4}.get((arch, mode))
    return row[COLUMNS.index(column)] if row else None
