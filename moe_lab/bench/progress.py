"""A tqdm.auto progress bar (renders in notebooks and terminals), or None without tqdm."""


def progress_bar(total: int, enabled: bool, desc: str, unit: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the `lab` extra; measuring works without it
        return None
    return tqdm(total=total, desc=desc, unit=unit)
