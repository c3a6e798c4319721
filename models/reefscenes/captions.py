"""Captions for ReefScenes layouts: five per image, varied the way different annotators would write them.

Variety comes from templates (subject first, place first, relation inverted, "there is", "a photo of"),
synonyms for nouns, verbs, relations and backgrounds, optional detail (colour, count words) and word order.
Underwater captions may also name the water conditions ("in murky green water"); in-air captions never do,
so adapting to underwater captions involves the language side too.
"""

from __future__ import annotations

import re

import numpy as np

NOUNS = {
    "reef fish": ["fish", "reef fish", "tropical fish"],
    "angelfish": ["angelfish", "fish"],
    "clownfish": ["clownfish", "clown fish", "fish"],
    "pufferfish": ["pufferfish", "puffer fish", "blowfish"],
    "barracuda": ["barracuda", "fish"],
    "sea turtle": ["turtle", "sea turtle"],
    "stingray": ["stingray", "ray"],
    "manta ray": ["manta ray", "manta", "ray"],
    "reef shark": ["shark", "reef shark"],
    "jellyfish": ["jellyfish", "jelly"],
    "scuba diver": ["diver", "scuba diver"],
    "starfish": ["starfish", "sea star"],
    "sea anemone": ["anemone", "sea anemone"],
    "brain coral": ["brain coral", "coral"],
    "branching coral": ["branching coral", "staghorn coral", "coral"],
    "sea fan": ["sea fan", "fan coral"],
    "table coral": ["table coral", "plate coral", "coral"],
    "kelp": ["kelp", "seaweed"],
    "rock": ["rock", "boulder"],
    "shipwreck": ["shipwreck", "wreck", "sunken ship"],
}
SAME_PLURAL = {
    "fish",
    "reef fish",
    "tropical fish",
    "angelfish",
    "clownfish",
    "clown fish",
    "pufferfish",
    "puffer fish",
}
SAME_PLURAL |= {"blowfish", "jellyfish", "starfish"}
MASS = {"kelp", "seaweed"}  # no article: "some kelp", not "a kelp"
VERBS = {  # kind -> (-ing forms, 3rd person singular, plural)
    "fish": (["swimming", "hovering", "gliding"], ["swims", "hovers"], ["swim", "hover"]),
    "turtle": (["swimming", "gliding", "paddling"], ["swims", "glides"], ["swim", "glide"]),
    "ray": (["gliding", "swimming"], ["glides", "swims"], ["glide", "swim"]),
    "shark": (["swimming", "cruising"], ["swims", "cruises"], ["swim", "cruise"]),
    "jellyfish": (["drifting", "floating"], ["drifts", "floats"], ["drift", "float"]),
    "diver": (["swimming", "diving"], ["swims", "dives"], ["swim", "dive"]),
    "starfish": (["lying", "resting"], ["lies", "rests"], ["lie", "rest"]),
    "anemone": (["growing", "sitting"], ["grows", "sits"], ["grow", "sit"]),
    "coral": (["growing"], ["grows"], ["grow"]),
    "kelp": (["swaying", "growing"], ["sways", "grows"], ["sway", "grow"]),
    "rock": (["sitting", "lying"], ["sits", "lies"], ["sit", "lie"]),
    "wreck": (["lying", "resting"], ["lies", "rests"], ["lie", "rest"]),
}
RELATIONS = {
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "beside": ["beside", "next to", "alongside"],
    "in front of": ["in front of"],
}
INVERSE = {"above": "below", "below": "above", "beside": "beside", "in front of": "behind"}
RELATIONS["behind"] = ["behind"]
PLACES = {  # background -> (phrases for swimmers, phrases for things on the bottom)
    "sand": (
        ["over the sand", "above a sandy bottom", "over the sandy seafloor"],
        ["on the sand", "on a sandy bottom"],
    ),
    "reef": (["over a coral reef", "above the reef", "near a reef"], ["on a coral reef", "on the reef"]),
    "rocky bottom": (
        ["over a rocky bottom", "above the rocks", "over rocky ground"],
        ["on a rocky bottom", "among rocks"],
    ),
    "open water": (["in open water", "in the open sea"], ["in open water"]),
}
COUNT_WORDS = {2: ["two", "a pair of"], 3: ["three", "a few", "a group of three"], 4: ["four", "several", "a group of"]}
SCHOOL = {"fish", "reef fish", "tropical fish", "angelfish", "barracuda", "clownfish"}
OPENERS = ["a photo of", "an image of", "a picture of", "a close up of", "a view of"]
# What only underwater captions say (the condition vocabulary); in-air captions never match this.
# "open water" is a background, not a condition, so "water" counts only without "open" before it.
CONDITIONS_RE = re.compile(r"\b(murky|hazy|clear|dim|torch|dive light|particles|marine snow)\b|(?<!open )\bwater\b")


def names_conditions(caption: str) -> bool:
    """Whether a caption describes the water or light conditions (only underwater captions do)."""
    return CONDITIONS_RE.search(caption) is not None


def _c(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    if noun in SAME_PLURAL:
        return noun
    return noun + ("es" if noun.endswith(("sh", "ch", "s")) else "s")


def noun_phrase(rng, group: dict, colour_p: float = 0.6, detail: bool = True) -> tuple[str, bool]:
    """("two yellow angelfish", plural?) for a subject group, with random synonym, colour and count word."""
    noun = _c(rng, NOUNS[group["variant"]])
    colour = group["colour"] if detail and rng.random() < colour_p else None
    if group["kind"] == "diver":  # the colour is the wetsuit's
        colour = None
    count = group["count"]
    adj = f"{colour} " if colour else ""
    if count == 1:
        text = f"{adj}{noun}"
        if noun in MASS:
            return (f"some {text}" if rng.random() < 0.5 else text), False
        phrase = f"{_article(text)} {text}" if rng.random() < 0.85 else f"one {text}"
        if group["kind"] == "diver" and detail and rng.random() < 0.6:
            phrase += f" in a {group['colour']} wetsuit"
        return phrase, False
    words = COUNT_WORDS[count]
    if count >= 3 and noun in SCHOOL:
        words = words + ["a school of", "a small school of"]
    word = _c(rng, words)
    return f"{word} {adj}{_plural(noun)}", True


def _verb(rng, kind: str, form: int, plural: bool = False) -> str:
    ing, sing, plur = VERBS[kind]
    return _c(rng, ing) if form == 0 else _c(rng, plur if plural else sing)


def _place(rng, scene: dict, group: dict) -> str:
    swim, floor = PLACES[scene["background"]]
    return _c(rng, swim if group["kind"] in ("fish", "turtle", "ray", "shark", "jellyfish", "diver") else floor)


def _one_caption(rng, scene: dict, template: int) -> str:
    subj, ref, rel = scene["subject"], scene["reference"], scene["relation"]
    kind = subj["kind"]
    np_s, plural = noun_phrase(rng, subj)
    be = "are" if plural and not np_s.startswith("a ") else "is"  # "there is a pair of", "there are two"
    if ref is not None and template in (0, 1, 2, 3, 4):
        np_r, _ = noun_phrase(rng, ref, colour_p=0.35)
        word = _c(rng, RELATIONS[rel])
        if template == 0:
            return f"{np_s} {_verb(rng, kind, 0)} {word} {np_r}"
        if template == 1:
            return f"there {be} {np_s} {word} {np_r} {_place(rng, scene, subj)}"
        if template == 2:  # the reference first, the relation turned around
            inv = _c(rng, RELATIONS[INVERSE[rel]])
            return f"{np_r} {inv} {np_s}" + (f" {_place(rng, scene, ref)}" if rng.random() < 0.4 else "")
        if template == 3:
            return f"{word} {np_r} {np_s} {_verb(rng, kind, 1, plural)}"
        return f"{_c(rng, OPENERS)} {np_s} {word} {np_r}"
    if template in (0, 5):
        return f"{np_s} {_verb(rng, kind, 0)} {_place(rng, scene, subj)}"
    if template in (1, 6):
        return f"{_c(rng, OPENERS)} {np_s} {_place(rng, scene, subj)}"
    if template in (2, 7) and scene["scenery"]:
        other, _ = noun_phrase(rng, scene["scenery"][0], colour_p=0.3)
        return f"{np_s} {_verb(rng, kind, 0)} near {other}"
    if template in (3, 8):
        return f"{np_s} {_verb(rng, kind, 1, plural)} {_place(rng, scene, subj)}"
    if template == 4 and ref is not None:
        np_r, _ = noun_phrase(rng, ref, colour_p=0.3)
        return f"{np_s} and {np_r} {_place(rng, scene, subj)}"
    if rng.random() < 0.5:
        return f"{_c(rng, ['there ' + be, 'you can see'])} {np_s} {_place(rng, scene, subj)}"
    short, _ = noun_phrase(rng, subj, detail=False)  # a terse annotator: no colour
    return f"{short} {_place(rng, scene, subj)}"


def condition_phrase(rng, conditions: dict) -> str:
    """ "in murky green water", "lit by a diver's torch", ... from the rendering's conditions."""
    colour, clarity = conditions["colour"], conditions["clarity"]
    options = [
        f"in {clarity} {colour} water",
        f"in {colour} water",
        f"in {clarity} water",
        f"through {clarity} {colour} water",
    ]
    phrase = _c(rng, options)
    if conditions.get("dim") and rng.random() < 0.5:
        phrase = _c(rng, ["in dim light", f"in dim {colour} water"])
    if conditions.get("artificial_light") and rng.random() < 0.5:
        phrase = _c(rng, ["lit by a diver's torch", "in the beam of a dive light"])
    if conditions.get("marine_snow") and rng.random() < 0.4:
        phrase += _c(rng, [" with floating particles", " with marine snow"])
    return phrase


def make_captions(rng: np.random.Generator, scene: dict, conditions: dict | None = None, n: int = 5) -> list[str]:
    """``n`` distinct captions; with ``conditions`` (underwater) two or three of them name the water."""
    templates = list(rng.permutation(9))
    out: list[str] = []
    attempts = 0
    while len(out) < n and attempts < 60:
        template = int(templates[attempts % len(templates)])
        attempts += 1
        text = " ".join(_one_caption(rng, scene, template).split())
        if text not in out:
            out.append(text)
    if len(out) < n:  # tiny scenes can run short of distinct sentences: vary the ending instead
        base = out[0]
        for extra in ("in this scene", "in the picture", "seen up close", "from the side", "in view"):
            if len(out) < n and f"{base} {extra}" not in out:
                out.append(f"{base} {extra}")
    if conditions is not None:
        for i in sorted(rng.choice(n, size=int(rng.integers(2, 4)), replace=False)):
            out[i] = f"{out[i]} {condition_phrase(rng, conditions)}"
    return out


def describe_conditions(params: dict, channel_means: tuple[float, float, float]) -> dict:
    """Words for the conditions of one rendering: water colour from the image itself, clarity from physics."""
    from reefcap.models.reefscenes.optics import JERLOV_N

    r, g, b = channel_means
    if r > 0.85 * g and b < 0.75 * g:
        colour = "yellowish green" if g >= r else "brownish"
    elif b > 1.08 * g:
        colour = "blue"
    elif g > 1.08 * b:
        colour = "green"
    else:
        colour = "blue green"
    n_g = JERLOV_N[params["water_type"]][1]
    # Share of veiling light at the subject: how much of what the camera sees there is haze.
    haze = 1 - n_g ** (params["turbidity"] * params["range_m"])
    clarity = "clear" if haze < 0.2 else "hazy" if haze < 0.4 else "murky"
    return {
        "colour": colour,
        "clarity": clarity,
        "dim": n_g ** params["light_depth_m"] < 0.25,
        "artificial_light": params.get("artificial_light", 0) > 0,
        "marine_snow": params.get("marine_snow", 0) > 0,
    }
