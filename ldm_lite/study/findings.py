"""The sentences of the study's reports that state a result, each chosen by the measured numbers."""
import math


def significant(row: dict, base: dict, value: str, sd: str) -> tuple:
    """(row[value] - base[value], whether it exceeds two standard deviations sqrt(sd_row^2 + sd_base^2))."""
    difference = row[value] - base[value]
    return difference, abs(difference) > 2 * math.hypot(row[sd], base[sd])


def band_findings(destruction: list, band_leak: list, num_train_timesteps: int = 1000) -> list:
    """Sentences on which DCT band is destroyed last, per schedule, and how much SNR the DC band keeps at t0.

    destruction: rows with schedule, noise, band, destruction_timestep (num_train_timesteps when never destroyed);
    band_leak: rows with schedule, spacing, band, t0, snr_at_t0.
    """
    sentences = []
    for schedule, noise in dict.fromkeys((row["schedule"], row.get("noise", "white")) for row in destruction):
        rows = sorted((r for r in destruction if r["schedule"] == schedule and r.get("noise", "white") == noise),
                      key=lambda r: r["band"])
        if noise != "white":
            schedule = f"{schedule} with {noise} noise"
        dc, last = rows[0], max(rows, key=lambda r: (r["destruction_timestep"], -r["band"]))
        never = [r["band"] for r in rows if r["destruction_timestep"] >= num_train_timesteps]
        if dc["band"] in never:
            text = f"under {schedule} the DC band is never destroyed (its SNR stays above 1 up to t = " \
                   f"{num_train_timesteps - 1})"
        elif last is dc:
            text = f"under {schedule} the DC band is the last to fall below SNR 1, at t = {dc['destruction_timestep']}"
        else:
            text = (f"under {schedule} band {last['band']} is the last to fall below SNR 1 (t = "
                    f"{last['destruction_timestep']}), not the DC band (t = {dc['destruction_timestep']})")
        if never and dc["band"] not in never:
            text += f"; bands {never} are never destroyed"
        sentences.append(text[0].upper() + text[1:] + ".")
    for row in (r for r in band_leak if r["band"] == 0):
        kept = "keeps" if row["snr_at_t0"] > 0 else "has lost all"
        sentences.append(f"At the first sampled step of {row['schedule']} ({row['spacing']} spacing, t0 = "
                         f"{row['t0']}) the DC band {kept} signal: SNR {row['snr_at_t0']:.3g}.")
    return sentences


def offset_findings(rows: list) -> list:
    """Per model: the share of the gap between mid-grey (0) and the data's class mean that its dark and bright
    samples close (1 = they reach the data's class mean)."""
    sentences = []
    for model in dict.fromkeys(r["model"] for r in rows):
        extremes = [r for r in rows if r["model"] == model and r["asked"] in ("dark", "bright")]
        shares = [r["samples_mean"] / r["data_mean"] for r in extremes if abs(r["data_mean"]) > 1e-6]
        if shares:
            closed = sum(shares) / len(shares)
            sentences.append(f"{model}: asked for dark or bright, its samples get {closed:.0%} of the way from "
                             f"mid-grey to the data's class mean.")
    return sentences


def leak_findings(rows: list) -> list:
    """Per setting: whether the brightness spread of unconditional samples is squeezed (std ratio < 0.9),
    matches (0.9-1.1) or is wider than the data's, and which initial noise brings the standard model closest."""
    sentences = []
    for r in rows:
        ratio = r["std_ratio"]
        verdict = "squeezed toward mid-grey" if ratio < 0.9 else "wider than the data" if ratio > 1.1 else \
            "about as wide as the data's"
        sentences.append(f"{r['model']} from {r['initial_noise']}: brightness spread {verdict} (std ratio "
                         f"{ratio:.2f}, W1 {r['wasserstein']:.3f}).")
    standard = [r for r in rows if r["model"] == "standard"]
    if len(standard) > 1:
        best = min(standard, key=lambda r: r["wasserstein"])
        sentences.append(f"For the standard model, {best['initial_noise']} gives the brightness distribution "
                         f"closest to the data (lowest W1).")
    return sentences


def _beyond(beyond: bool) -> str:
    return "beyond" if beyond else "within"


CLIPPED = " (x0 clipped)"  # part 1's sampler label of a row whose sampler clipped its x0 estimates


def clipping_findings(rows: list) -> list:
    """Part 1. What x0 clipping changes: each clipped row (sampler label ending in CLIPPED) against the same sampler
    unclipped at the same NFE, in KID (judged against two standard deviations) and in brightness spread (std
    ratio to the data's, and luminance W1)."""
    sentences = []
    for clipped in (r for r in rows if r["sampler"].endswith(CLIPPED)):
        name = clipped["sampler"][:-len(CLIPPED)]
        plain = next((r for r in rows if r["sampler"] == name and r["nfe"] == clipped["nfe"]), None)
        if plain is None:
            continue
        difference, beyond = significant(clipped, plain, "kid", "kid_std")
        sentences.append(
            f"At {clipped['nfe']} model calls, clipping {name}'s x0 estimates ({clipped['x0_clipping']}) changes KID "
            f"from {plain['kid']:.4f} to {clipped['kid']:.4f} ({difference:+.4f}, {_beyond(beyond)} two standard "
            f"deviations) and the brightness spread from {plain['std_ratio']:.2f} to {clipped['std_ratio']:.2f} times "
            f"the data's (luminance W1 {plain['w1']:.3f} -> {clipped['w1']:.3f}).")
    return sentences


def sampler_findings(rows: list, floor: dict | None = None) -> list:
    """Part 1. Per NFE level, the sampler with the lowest KID and whether its lead over the runner-up exceeds two
    standard deviations; per sampler, its FID at its fewest and most model calls and whether KID moved; then what
    x0 clipping changes (`clipping_findings`)."""
    sentences = []
    for level in sorted({r["level"] for r in rows}):
        ranked = sorted((r for r in rows if r["level"] == level), key=lambda r: r["kid"])
        best, text = ranked[0], ""
        if len(ranked) > 1:
            lead = significant(ranked[1], best, "kid", "kid_std")[1]
            text = (f"; its lead over {ranked[1]['sampler']} (KID {ranked[1]['kid']:.4f}) is {_beyond(lead)} two "
                    "standard deviations")
        sentences.append(f"At about {level} model calls, {best['sampler']} has the lowest KID ({best['kid']:.4f} "
                         f"± {best['kid_std']:.4f}, FID {best['fid']:.2f}){text}." + floor_clause(best, floor))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            moved = significant(last, first, "kid", "kid_std")[1]
            sentences.append(f"{sampler}: FID {first['fid']:.2f} at {first['nfe']} model calls, {last['fid']:.2f} at "
                             f"{last['nfe']}; the KID change ({last['kid'] - first['kid']:+.4f}) is {_beyond(moved)} "
                             "two standard deviations.")
    return sentences + clipping_findings(rows)


def _edge(value: float, grid: list) -> str:
    """Where `value` sits in the grid of lambdas: "" inside it, else ", the grid's smallest" or ", ... largest"
    (a pick there may have its optimum beyond the grid)."""
    if value == max(grid) and value == min(grid):
        return ", the grid's only lambda"
    return ", the grid's smallest" if value == min(grid) else ", the grid's largest" if value == max(grid) else ""


def eps_findings(rows: list, scan: list = (), floor: dict | None = None) -> list:
    """Part 2. The constant lambda with the lowest FID (among the evaluated `rows` with eps_slope 0) against the
    lambda whose eps-norm along sampling is closest to the forward eps-norm (among every lambda of the scan,
    `exposure.scan_eps_scale`; rows {eps_scale, eps_norm_gap}): whether they agree (a pick at the grid's edge is
    never called agreement: the optimum may lie beyond it), whether FID's pick beats lambda = 1 by more than two
    KID standard deviations, and what each sloped schedule changes against the constant lambda of its mean."""
    constant = [r for r in rows if not r.get("eps_slope")]
    if not constant:
        return []
    by_fid = min(constant, key=lambda r: r["fid"])
    fid_edge = _edge(by_fid["eps_scale"], [r["eps_scale"] for r in constant])
    picked = f"FID picks lambda = {by_fid['eps_scale']:g}{fid_edge} (FID {by_fid['fid']:.2f})"
    finite = [r for r in scan if math.isfinite(r["eps_norm_gap"])]  # a chain that blew up picks nothing
    if finite:
        by_gap = min(finite, key=lambda r: r["eps_norm_gap"])
        gap_edge = _edge(by_gap["eps_scale"], [r["eps_scale"] for r in scan])
        same = by_fid["eps_scale"] == by_gap["eps_scale"]
        if fid_edge or gap_edge:
            verdict = ("they pick the same lambda, but at the grid's edge, which is not agreement: the optimum may lie "
                       "beyond the grid" if same else "they disagree, and a pick at the grid's edge may have its "
                       "optimum beyond the grid")
        else:
            verdict = "they agree" if same else "they disagree"
        sentences = [f"{picked}; the exposure metric (eps-norm along sampling closest to the forward eps-norm) picks "
                     f"lambda = {by_gap['eps_scale']:g}{gap_edge} (gap {by_gap['eps_norm_gap']:.4f}): {verdict}."]
    else:
        sentences = [f"{picked}; the eps-norm scan did not run, so the exposure metric has no pick."]
    sentences[0] += floor_clause(by_fid, floor)
    base = next((r for r in constant if r["eps_scale"] == 1.0), None)
    if base is not None and by_fid is not base:
        difference, beyond = significant(by_fid, base, "kid", "kid_std")
        sentences.append(f"Against lambda = 1, FID's pick changes KID by {difference:+.4f}, {_beyond(beyond)} two "
                         "standard deviations.")
    return sentences + slope_findings(rows)


def slope_findings(rows: list) -> list:
    """Part 2. Each sloped schedule lambda_t = k t + b (centred on its eps_scale over the N steps) against the
    constant lambda of the same mean: KID and FID, judged against two KID standard deviations."""
    sentences = []
    for row in (r for r in rows if r.get("eps_slope")):
        same_mean = next((r for r in rows if not r.get("eps_slope") and r["eps_scale"] == row["eps_scale"]), None)
        if same_mean is None:
            continue
        k, half_span = row["eps_slope"], row["eps_slope"] * (row["steps"] - 1) / 2
        difference, beyond = significant(row, same_mean, "kid", "kid_std")
        sentences.append(
            f"lambda_t = {k:g} t + b, from {row['eps_scale'] + half_span:.4f} at the noisiest step to "
            f"{row['eps_scale'] - half_span:.4f} at the last (mean {row['eps_scale']:g}), against the constant "
            f"{row['eps_scale']:g}: KID {same_mean['kid']:.4f} -> {row['kid']:.4f} ({difference:+.4f}, "
            f"{_beyond(beyond)} two standard deviations), FID {same_mean['fid']:.2f} -> {row['fid']:.2f}.")
    return sentences


VERDICTS = {(False, False): "changes neither quality nor brightness measurably",
            (False, True): "changes brightness only", (True, True): "changes brightness and quality",
            (True, False): "changes quality, not brightness"}


def change_findings(rows: list, label, group=lambda row: None, floor: dict | None = None) -> list:
    """Parts 3 and 4. Each row against its table's baseline row (of its `group(row)`: part 3 compares each model
    with itself from plain noise): does it change quality (KID) and brightness (luminance W1 against the data),
    each judged against two standard deviations (KID's over subsets, W1's by bootstrap)? label(row) names a row.
    With the real-data `floor` row, each sentence also says how far the row's KID is above it."""
    bases = {group(r): r for r in rows if r.get("beyond_2sd") == "baseline"}
    sentences = []
    for row in rows:
        base = bases.get(group(row))
        if base is None or row is base:
            continue
        kid_change, quality = significant(row, base, "kid", "kid_std")
        w1_change, brightness = significant(row, base, "w1", "w1_sd")
        sentences.append(
            f"{label(row)} against {label(base)}: {VERDICTS[quality, brightness]} at n = {row['n']} (KID "
            f"{base['kid']:.4f} -> {row['kid']:.4f}, {'lower' if kid_change < 0 else 'higher'}, {_beyond(quality)} two "
            f"standard deviations; luminance W1 {base['w1']:.3f} -> {row['w1']:.3f}, "
            f"{'closer to' if w1_change < 0 else 'further from'} the data, {_beyond(brightness)} two bootstrap "
            f"standard deviations; std ratio {base['std_ratio']:.2f} -> {row['std_ratio']:.2f})."
            + floor_clause(row, floor))
    return sentences


def floor_clause(row: dict, floor: dict | None) -> str:
    """' Against the real-data floor ...' : the row's KID minus the floor's, judged against two standard
    deviations; '' without a floor."""
    if floor is None:
        return ""
    gap, beyond = significant(row, floor, "kid", "kid_std")
    return (f" Against the real-data floor (KID {floor['kid']:.4f} of {floor['n']} held-out images): "
            f"{gap:+.4f}, {_beyond(beyond)} two standard deviations.")


def floor_findings(floor: dict | None) -> list:
    """What real images score at the study's n: the floor every setting is compared with."""
    if floor is None:
        return []
    return [f"The floor: {floor['n']} held-out real images ({floor['source']}) score KID {floor['kid']:.4f} ± "
            f"{floor['kid_std']:.4f}, FID {floor['fid']:.2f} against the same reference; no setting can be expected "
            "to score lower at this n."]


def schedule_findings(rows: list) -> list:
    """Part 3. What x_T keeps of the image under each model's schedule: sqrt(alpha_bar) at the first sampled step."""
    return [f"{r['model']} ({r['schedule']} schedule, {r['spacing']} spacing): the first of {r['steps']} steps is "
            f"t0 = {r['t0']}, where x_T keeps sqrt(alpha_bar) = {r['sqrt_alpha_bar_t0']:.4f} of the image."
            for r in rows]


def steering_findings(rows: list) -> list:
    """Part 3. How far DC steering moves the samples' mean brightness toward the target: from the paired,
    unsteered leak-aware samples' (rows with "unsteered_mean"), or, in results.json written before the pairing,
    from all plain-noise samples' ("plain_mean")."""
    sentences = []
    for r in (r for r in rows if math.isfinite(r["share"])):
        if "unsteered_mean" in r:
            what, start = f"the {r['model']} model's leak DC", f"{r['unsteered_mean']:+.3f} (the same seeds unsteered)"
        else:
            what, start = "the leak's DC", f"{r['plain_mean']:+.3f} (plain noise)"
        sentences.append(f"Steering {what} to the {r['steered_to']} tercile's mean ({r['target_mean']:+.3f}) moves "
                         f"the samples' mean brightness from {start} to {r['samples_mean']:+.3f}: {r['share']:.0%} of "
                         f"the way (sqrt(alpha_bar) = {r['sqrt_alpha_bar_t0']:.4f} at t0 = {r['t0']}).")
    return sentences


def quality_findings(tables: dict) -> dict:
    """{part: sentences} of the study, each chosen by the numbers of its tables."""
    floor = (tables.get("floor") or [None])[0]
    return {"floor": floor_findings(floor), "samplers": sampler_findings(tables["samplers"], floor),
            "eps": eps_findings(tables["eps"], tables.get("scan", []), floor),
            "leak": schedule_findings(tables.get("schedules", []))
            + change_findings(tables["leak"], lambda r: f"the {r.get('model', 'standard')} model from {r['start']}",
                              lambda r: r.get("model", "standard"), floor)
            + steering_findings(tables["steering"]),
            "fixes": change_findings(tables["fixes"], lambda r: f"{r['model']} (from {r['start']})", floor=floor)
            + offset_findings(tables["terciles"])}
