"""What the benchmarks' plots share: labelled, gridded axes with a legend."""


def label_axes(ax, xlabel: str, ylabel: str, title: str, **legend) -> None:
    """Axis labels, a title, a small legend (``legend``: further ``ax.legend`` options) and a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**{"fontsize": 7, **legend})
    ax.grid(alpha=0.3)
