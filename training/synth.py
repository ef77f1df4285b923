"""Seeded synthetic shop: a catalogue with descriptive text and users whose behaviour follows it.

Tests and the demo need data that exercises every part of the model without the real logs: item
text that carries the interests users act on (so a text encoder can learn them), a Zipf popularity
skew (so popularity is a strong baseline), complementary co-purchases (so item co-occurrence has
signal), repurchases of consumables (so repeat candidates matter), a view → click → cart →
purchase funnel, and new items at the end of the window (cold start). Fully vectorised with numpy:
one million interactions take a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from training.argtypes import positive_int

DAY = 86_400
DEFAULT_START = 1_704_067_200  # 2024-01-01 00:00 UTC
EVENTS = ("view", "click", "cart", "purchase")
VIEW, CLICK, CART, PURCHASE = range(4)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Category:
    """One product category: the vocabulary its items are described with and how it is bought."""

    name: str
    theme: str
    products: tuple[str, ...]
    adjectives: tuple[str, ...]
    materials: tuple[str, ...]
    features: tuple[str, ...]
    uses: tuple[str, ...]
    brands: tuple[str, ...]
    price: tuple[float, float]
    consumable: bool
    goes_with: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category(
        "running shoes",
        "fitness",
        ("Running Shoes", "Trail Running Shoes", "Road Running Sneakers", "Racing Running Flats"),
        ("Lightweight", "Cushioned", "Responsive", "Stable", "Fast"),
        ("Mesh", "Knit", "Gore-Tex", "Recycled Mesh"),
        (
            "responsive foam cushioning",
            "a breathable mesh upper",
            "a grippy rubber outsole",
            "reflective details for night runs",
        ),
        ("daily running", "marathon training", "trail running", "tempo runs"),
        ("Stridex", "Paceline", "Veloro", "Runara"),
        (60.0, 180.0),
        False,
        ("running apparel", "protein powder"),
    ),
    Category(
        "running apparel",
        "fitness",
        ("Running Shorts", "Running Tee", "Running Jacket", "Running Socks", "Running Tights"),
        ("Breathable", "Quick-Dry", "Reflective", "Seamless", "Windproof"),
        ("Polyester", "Merino", "Nylon", "Recycled Polyester"),
        (
            "sweat-wicking fabric",
            "flatlock seams against chafing",
            "a zip pocket for keys",
            "reflective trims",
        ),
        ("long runs", "race day", "interval training", "winter running"),
        ("Stridex", "Paceline", "Kinetic", "Runara"),
        (15.0, 90.0),
        False,
        ("running shoes",),
    ),
    Category(
        "yoga mats",
        "fitness",
        ("Yoga Mat", "Travel Yoga Mat", "Yoga Block", "Yoga Strap", "Yoga Bolster"),
        ("Non-Slip", "Extra Thick", "Foldable", "Eco", "Grippy"),
        ("Natural Rubber", "Cork", "TPE", "Jute"),
        ("a non-slip textured surface", "joint-friendly cushioning", "alignment lines", "a carry strap"),
        ("vinyasa flow", "hot yoga", "pilates", "stretching at home"),
        ("Lotusa", "Zenflow", "Asana Lab", "Mandara"),
        (15.0, 120.0),
        False,
        ("yoga leggings",),
    ),
    Category(
        "yoga leggings",
        "fitness",
        ("Yoga Leggings", "High-Waist Yoga Pants", "Yoga Shorts", "Yoga Bra Top"),
        ("Buttery-Soft", "Sculpting", "Squat-Proof", "Seamless", "Stretchy"),
        ("Nylon", "Spandex", "Bamboo", "Organic Cotton"),
        ("four-way stretch", "a high waistband", "a hidden pocket", "moisture-wicking fabric"),
        ("yoga classes", "barre", "studio workouts", "lounging"),
        ("Lotusa", "Zenflow", "Mandara", "Kinetic"),
        (25.0, 95.0),
        False,
        ("yoga mats",),
    ),
    Category(
        "protein powder",
        "fitness",
        ("Whey Protein Powder", "Vegan Protein Powder", "Protein Shake Mix", "Casein Protein Powder"),
        ("Chocolate", "Vanilla", "Unflavoured", "Salted Caramel", "Strawberry"),
        ("Whey Isolate", "Pea Protein", "Grass-Fed Whey", "Soy Protein"),
        ("25 g of protein per scoop", "no added sugar", "easy mixing", "added digestive enzymes"),
        ("post-workout recovery", "muscle building", "breakfast shakes", "endurance training"),
        ("Musclea", "PureFuel", "Kinetic", "Ironleaf"),
        (20.0, 70.0),
        True,
        ("running shoes", "running apparel"),
    ),
    Category(
        "espresso coffee",
        "coffee",
        ("Espresso Beans", "Espresso Roast Coffee", "Espresso Capsules", "Ground Espresso Coffee"),
        ("Dark Roast", "Medium Roast", "Single-Origin", "Organic", "Decaf"),
        ("Arabica", "Robusta Blend", "Colombian Arabica", "Ethiopian Arabica"),
        ("notes of dark chocolate", "a rich crema", "low acidity", "a fruity finish"),
        ("espresso machines", "moka pots", "cappuccinos", "flat whites"),
        ("Caffio", "Barista Bros", "Roastery Nine", "Crema Co"),
        (8.0, 35.0),
        True,
        ("coffee gear",),
    ),
    Category(
        "coffee gear",
        "coffee",
        ("Coffee Grinder", "Coffee Tamper", "Coffee Scale", "Coffee Mug", "Coffee Milk Frother"),
        ("Precision", "Manual", "Electric", "Insulated", "Compact"),
        ("Stainless Steel", "Ceramic", "Glass", "Walnut Wood"),
        (
            "burrs for an even grind",
            "a 0.1 g accurate scale",
            "double-wall insulation",
            "a barista-grade finish",
        ),
        ("home espresso", "pour-over brewing", "latte art", "coffee at the office"),
        ("Barista Bros", "Crema Co", "Brewcraft", "Tamp & Co"),
        (12.0, 150.0),
        False,
        ("espresso coffee", "green tea"),
    ),
    Category(
        "green tea",
        "coffee",
        ("Green Tea", "Matcha Green Tea", "Jasmine Green Tea", "Sencha Green Tea"),
        ("Organic", "Ceremonial", "Loose-Leaf", "Premium", "Calming"),
        ("Japanese Leaves", "Chinese Leaves", "Tea Bags", "Stone-Ground Leaves"),
        ("a grassy sweet flavour", "natural antioxidants", "gentle caffeine", "hand-picked leaves"),
        ("morning rituals", "afternoon breaks", "iced tea", "matcha lattes"),
        ("Leafhouse", "Teavana Hills", "Zen Leaf", "Brewcraft"),
        (6.0, 40.0),
        True,
        ("coffee gear",),
    ),
    Category(
        "phone cases",
        "tech",
        ("Phone Case", "Phone Wallet Case", "Phone Bumper Case", "Clear Phone Case"),
        ("Slim", "Rugged", "Shockproof", "Magnetic", "Transparent"),
        ("Silicone", "Leather", "Polycarbonate", "TPU"),
        ("raised edges to protect the screen", "MagSafe-compatible magnets", "drop protection", "card slots"),
        ("everyday carry", "outdoor adventures", "work", "travel"),
        ("Armorix", "Casely", "Voltix", "Shieldo"),
        (10.0, 60.0),
        False,
        ("phone chargers", "wireless headphones"),
    ),
    Category(
        "phone chargers",
        "tech",
        ("Phone Charger", "Wireless Phone Charger", "Phone Car Charger", "Phone Charging Cable"),
        ("Fast", "Compact", "Dual-Port", "Braided", "Foldable"),
        ("GaN", "Aluminium", "Nylon Braided", "Recycled Plastic"),
        ("65 W fast charging", "USB-C power delivery", "overheat protection", "a tangle-free cable"),
        ("charging at the desk", "road trips", "travel", "bedside charging"),
        ("Voltix", "Ampere", "Chargeon", "Armorix"),
        (9.0, 70.0),
        False,
        ("phone cases",),
    ),
    Category(
        "wireless headphones",
        "tech",
        (
            "Wireless Headphones",
            "Wireless Earbuds",
            "Wireless Sport Earphones",
            "Wireless Over-Ear Headphones",
        ),
        ("Noise-Cancelling", "Bass-Boosted", "Sweatproof", "Hi-Fi", "Lightweight"),
        ("Memory Foam", "Aluminium", "Silicone", "Matte Plastic"),
        ("active noise cancelling", "30 hours of battery", "a low-latency mode", "Bluetooth 5.3"),
        ("commuting", "gym sessions", "calls", "music at home"),
        ("Sonique", "Ampere", "Voltix", "Bassline"),
        (30.0, 300.0),
        False,
        ("phone cases", "phone chargers"),
    ),
    Category(
        "t-shirts",
        "fashion",
        ("T-Shirt", "Crew Neck T-Shirt", "V-Neck T-Shirt", "Pocket T-Shirt", "Oversized T-Shirt"),
        ("Classic", "Relaxed", "Slim-Fit", "Vintage", "Heavyweight"),
        ("Organic Cotton", "Linen", "Jersey", "Pima Cotton"),
        ("a soft brushed finish", "a ribbed collar", "a relaxed drop shoulder", "pre-shrunk fabric"),
        ("everyday wear", "weekends", "layering", "summer days"),
        ("Northwear", "Basico", "Urban Thread", "Loomly"),
        (10.0, 45.0),
        False,
        ("denim jeans",),
    ),
    Category(
        "denim jeans",
        "fashion",
        ("Slim Denim Jeans", "Straight Denim Jeans", "Relaxed Denim Jeans", "Denim Jacket"),
        ("Washed", "Raw", "Stretch", "Distressed", "Dark Indigo"),
        ("Selvedge Denim", "Stretch Denim", "Organic Denim", "Recycled Denim"),
        ("a classic five-pocket design", "reinforced stitching", "comfort stretch", "a mid-rise waist"),
        ("casual days", "nights out", "the office", "everyday wear"),
        ("Indigo Works", "Northwear", "Urban Thread", "Rivet & Co"),
        (40.0, 140.0),
        False,
        ("t-shirts",),
    ),
    Category(
        "shampoo",
        "care",
        ("Shampoo", "Anti-Dandruff Shampoo", "Volume Shampoo", "Shampoo Bar", "Moisturising Shampoo"),
        ("Gentle", "Clarifying", "Sulphate-Free", "Repairing", "Fresh"),
        ("Argan Oil", "Tea Tree", "Coconut", "Keratin"),
        (
            "a sulphate-free formula",
            "a fresh herbal scent",
            "colour-safe cleansing",
            "a nourishing oil blend",
        ),
        ("daily washing", "dry hair", "oily scalps", "curly hair"),
        ("Luma", "Hairloom", "Purely", "Botanica"),
        (5.0, 30.0),
        True,
        ("face care",),
    ),
    Category(
        "face care",
        "care",
        ("Face Cream", "Face Serum", "Face Cleanser", "Face Mask", "Face Moisturiser"),
        ("Hydrating", "Brightening", "Anti-Ageing", "Soothing", "Oil-Free"),
        ("Hyaluronic Acid", "Vitamin C", "Niacinamide", "Aloe Vera"),
        (
            "fast-absorbing hydration",
            "a fragrance-free formula",
            "dermatologist testing",
            "SPF 30 protection",
        ),
        ("morning routines", "sensitive skin", "night care", "dry skin"),
        ("Dermaleaf", "Luma", "Purely", "Glowen"),
        (8.0, 60.0),
        True,
        ("shampoo",),
    ),
    Category(
        "dog food",
        "pets",
        ("Dog Food", "Puppy Dog Food", "Grain-Free Dog Food", "Dog Treats", "Senior Dog Food"),
        ("Chicken", "Salmon", "Lamb", "Grain-Free", "High-Protein"),
        ("Dry Kibble", "Wet Food", "Freeze-Dried", "Natural"),
        (
            "real meat as the first ingredient",
            "added omega-3 for a shiny coat",
            "no artificial colours",
            "easy digestion",
        ),
        ("small breeds", "large breeds", "puppies", "active dogs"),
        ("Barkley", "Pawsome", "Houndly", "Furfeast"),
        (10.0, 80.0),
        True,
        ("dog toys",),
    ),
    Category(
        "dog toys",
        "pets",
        ("Dog Chew Toy", "Dog Rope Toy", "Dog Ball", "Dog Puzzle Toy", "Dog Squeaky Toy"),
        ("Durable", "Squeaky", "Interactive", "Floating", "Tough"),
        ("Natural Rubber", "Cotton Rope", "Plush", "Nylon"),
        ("tough chewing", "a treat-dispensing centre", "a squeaker inside", "bright colours for fetch"),
        ("playtime", "teething puppies", "fetch in the park", "keeping dogs busy"),
        ("Pawsome", "Barkley", "Tailspin", "Houndly"),
        (5.0, 35.0),
        False,
        ("dog food",),
    ),
    Category(
        "camping tents",
        "outdoors",
        ("Camping Tent", "Backpacking Camping Tent", "Family Camping Tent", "Pop-Up Camping Tent"),
        ("Waterproof", "Ultralight", "Four-Season", "Instant", "Spacious"),
        ("Ripstop Nylon", "Polyester", "Aluminium Poles", "Silnylon"),
        ("a waterproof rainfly", "quick pitching", "mesh ventilation panels", "a large vestibule"),
        ("festival weekends", "backcountry camping", "family trips", "wild camping"),
        ("Trailpeak", "Summit Gear", "Northridge", "Campora"),
        (60.0, 450.0),
        False,
        ("hiking backpacks",),
    ),
    Category(
        "hiking backpacks",
        "outdoors",
        ("Hiking Backpack", "Hiking Daypack", "Hiking Hydration Pack", "Hiking Trekking Pack"),
        ("Ventilated", "Waterproof", "Ultralight", "Adjustable", "Rugged"),
        ("Ripstop Nylon", "Cordura", "Recycled Polyester", "Dyneema"),
        ("a ventilated back panel", "a hydration sleeve", "hip-belt pockets", "an integrated rain cover"),
        ("day hikes", "multi-day treks", "mountain trails", "travel"),
        ("Trailpeak", "Summit Gear", "Northridge", "Packwell"),
        (40.0, 250.0),
        False,
        ("camping tents",),
    ),
)


@dataclass(frozen=True)
class Behaviour:
    """Knobs of the simulated shoppers; the defaults give a realistic-looking log."""

    zipf_exponent: float = 1.0  # item popularity ∝ 1 / rank^a
    views_per_session: float = 2.0  # 1 + Poisson(this) items viewed per session
    p_click: float = 0.4
    p_cart: float = 0.4  # given a click
    p_purchase: float = 0.6  # given a cart add
    p_complement: float = 0.5  # a purchase pulls in one of its "goes with" items
    p_explore: float = 0.1  # session in a random category, not one of the user's interests
    p_repurchase: float = 0.6  # a consumable purchase is bought again after its cycle
    repurchase_cycle_days: float = 7.0
    new_item_fraction: float = 0.05  # released in the last 20% of the window
    unreleased_item_fraction: float = 0.02  # in the catalogue, released at the very end (no interactions)
    complements_per_item: int = 3


def generate(
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_interactions: int = 50_000,
    *,
    days: int = 30,
    seed: int = 0,
    start: int = DEFAULT_START,
    behaviour: Behaviour = Behaviour(),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Simulate a shop; returns (interactions, items) in the canonical column layout.

    interactions: user_id, item_id, timestamp (epoch s, in [start, start + days)), event; exactly
    `n_interactions` rows sorted by time. items: item_id, title, description, category, brand, price.
    The same arguments always give the same frames.
    """
    _check_sizes(n_users=n_users, n_items=n_items, n_interactions=n_interactions, days=days)
    rng = np.random.default_rng(seed)
    catalogue = _make_catalogue(n_items, days, start, behaviour, rng)
    users = _make_users(n_users, rng)
    rows = _simulate(catalogue, users, n_interactions, days, start, behaviour, rng)
    return _interactions_frame(rows, n_users, n_items), catalogue.frame


def write_dataset(
    folder: str | Path,
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_interactions: int = 50_000,
    *,
    days: int = 30,
    seed: int = 0,
    fmt: str = "parquet",
    start: int = DEFAULT_START,
    behaviour: Behaviour = Behaviour(),
) -> Path:
    """Generate a shop and write it as a canonical folder (interactions + items); returns the folder."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output path {folder} exists and is not a directory")
    interactions, items = generate(
        n_users, n_items, n_interactions, days=days, seed=seed, start=start, behaviour=behaviour
    )
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("interactions", interactions), ("items", items)):
        other = folder / f"{name}.{'csv' if fmt == 'parquet' else 'parquet'}"
        other.unlink(missing_ok=True)  # a stale file in the other format would make the folder ambiguous
        path = folder / f"{name}.{fmt}"
        frame.write_parquet(path) if fmt == "parquet" else frame.write_csv(path)
    log.info("wrote %d interactions and %d items to %s", interactions.height, items.height, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Catalogue


@dataclass(frozen=True)
class _Catalogue:
    frame: pl.DataFrame
    category: np.ndarray  # int per item
    release_ts: np.ndarray  # first moment the item can be interacted with
    complements: np.ndarray  # [n_items, k] item indices bought together
    by_category: _GroupSampler  # all items of a category, popularity-weighted
    launched_by_category: _GroupSampler  # only items available from the start
    by_brand: _GroupSampler  # group = category * max_brands + brand
    max_brands: int


def _make_catalogue(
    n_items: int, days: int, start: int, b: Behaviour, rng: np.random.Generator
) -> _Catalogue:
    n_cat = len(CATEGORIES)
    shares = rng.dirichlet(np.full(n_cat, 4.0))
    category = np.concatenate(
        [np.arange(min(n_cat, n_items)), rng.choice(n_cat, max(0, n_items - n_cat), p=shares)]
    )
    category = category[:n_items].astype(np.int64)
    n_brands = np.array([len(c.brands) for c in CATEGORIES])
    max_brands = int(n_brands.max())
    # Brands inside a category are Zipf-skewed too: a couple of big names, a long tail.
    brand = np.floor(rng.power(0.6, n_items) * n_brands[category]).astype(np.int64)
    adjective, material, product, feature_a, feature_b, use = (
        _pick_within(rng, category, [len(getattr(c, f)) for c in CATEGORIES])
        for f in ("adjectives", "materials", "products", "features", "features", "uses")
    )
    low = np.array([c.price[0] for c in CATEGORIES])[category]
    high = np.array([c.price[1] for c in CATEGORIES])[category]
    price = np.round(np.exp(rng.uniform(np.log(low), np.log(high))), 0) - 0.01

    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** b.zipf_exponent
    release_ts = np.full(n_items, start, dtype=np.int64)
    # The first item of each category is always available so every category can be sampled early.
    eligible = np.arange(n_items) >= n_cat
    draw = rng.random(n_items)
    new = eligible & (draw < b.new_item_fraction)
    unreleased = (
        eligible & (draw >= b.new_item_fraction) & (draw < b.new_item_fraction + b.unreleased_item_fraction)
    )
    release_ts[new] = start + (rng.uniform(0.8, 1.0, int(new.sum())) * days * DAY).astype(np.int64)
    release_ts[unreleased] = start + days * DAY

    titles, descriptions = [], []
    for i in range(n_items):
        c = CATEGORIES[category[i]]
        prod = c.products[product[i]]
        fa, fb = c.features[feature_a[i]], c.features[feature_b[i]]
        titles.append(f"{c.brands[brand[i]]} {c.adjectives[adjective[i]]} {c.materials[material[i]]} {prod}")
        sentence = f"{c.adjectives[adjective[i]]} {prod.lower()} by {c.brands[brand[i]]}, made with {c.materials[material[i]].lower()} and {fa}."
        if fb != fa:
            sentence += f" Ideal for {c.uses[use[i]]}, with {fb}."
        descriptions.append(sentence)
    frame = pl.DataFrame(
        {
            "item_id": _ids("item", n_items),
            "title": titles,
            "description": descriptions,
            "category": [CATEGORIES[k].name for k in category],
            "brand": [CATEGORIES[k].brands[j] for k, j in zip(category, brand)],
            "price": price.astype(np.float64),
        }
    )
    launched = release_ts == start
    by_category = _GroupSampler(category, popularity, n_cat)
    return _Catalogue(
        frame=frame,
        category=category,
        release_ts=release_ts,
        complements=_make_complements(category, by_category, b.complements_per_item, rng),
        by_category=by_category,
        launched_by_category=_GroupSampler(category, popularity * launched, n_cat),
        by_brand=_GroupSampler(category * max_brands + brand, popularity, n_cat * max_brands),
        max_brands=max_brands,
    )


def _make_complements(
    category: np.ndarray, sampler: _GroupSampler, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Each item's fixed "goes with" partners, drawn from its complementary categories by popularity."""
    names = [c.name for c in CATEGORIES]
    partner_cats = [[names.index(g) for g in c.goes_with] for c in CATEGORIES]
    n_items = category.size
    pick = rng.integers(0, 1 << 30, size=(n_items, k))
    partner = np.empty((n_items, k), dtype=np.int64)
    for cat, options in enumerate(partner_cats):
        members = np.flatnonzero(category == cat)
        chosen = np.asarray(options)[pick[members] % len(options)]
        partner[members] = chosen
    present = sampler.has_items[partner]
    partner = np.where(present, partner, category[:, None])  # fall back to the item's own category
    flat = sampler.sample(partner.ravel(), rng.random(partner.size))
    return flat.reshape(n_items, k)


class _GroupSampler:
    """Weighted sampling of an item inside a group, for many (group, uniform) pairs at once.

    Items are laid out by group on one number line where group g covers (g, g + 1], each item's
    share proportional to its weight, so a single searchsorted samples every row.
    """

    def __init__(self, group: np.ndarray, weight: np.ndarray, n_groups: int) -> None:
        order = np.argsort(group, kind="stable")
        g, w = group[order], weight[order].astype(np.float64)
        totals = np.bincount(g, weights=w, minlength=n_groups)
        offsets = np.concatenate([[0.0], np.cumsum(totals)])
        within = (np.cumsum(w) - offsets[g]) / np.where(totals[g] > 0, totals[g], 1.0)
        self.order = order
        self.keys = g + within
        self.has_items = totals > 0
        self.last = np.searchsorted(g, np.arange(n_groups), side="right") - 1

    def sample(self, groups: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item index per row; every group passed must have items (has_items)."""
        pos = np.searchsorted(self.keys, groups + np.clip(u, 1e-12, 1.0 - 1e-12), side="left")
        return self.order[np.minimum(pos, self.last[groups])]


def _pick_within(rng: np.random.Generator, category: np.ndarray, sizes: list[int]) -> np.ndarray:
    return np.floor(rng.random(category.size) * np.asarray(sizes)[category]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Users and sessions


@dataclass(frozen=True)
class _Users:
    interests: np.ndarray  # [n_users, 3] category indices
    interest_cdf: np.ndarray  # [n_users, 3] cumulative probabilities
    brand: np.ndarray  # [n_users, 3] preferred brand index in each interest category
    brand_loyalty: np.ndarray  # probability to shop the preferred brand
    activity: np.ndarray  # normalised session share


def _make_users(n_users: int, rng: np.random.Generator) -> _Users:
    themes = sorted({c.theme for c in CATEGORIES})
    theme_cats = [[i for i, c in enumerate(CATEGORIES) if c.theme == t] for t in themes]
    width = max(map(len, theme_cats))
    table = np.array([tc + [tc[0]] * (width - len(tc)) for tc in theme_cats])
    sizes = np.array([len(tc) for tc in theme_cats])
    theme = rng.integers(0, len(themes), n_users)
    first = table[theme, np.floor(rng.random(n_users) * sizes[theme]).astype(np.int64)]
    second = table[theme, np.floor(rng.random(n_users) * sizes[theme]).astype(np.int64)]
    third = rng.integers(0, len(CATEGORIES), n_users)
    interests = np.stack([first, second, third], axis=1)
    weights = rng.dirichlet([3.0, 1.5, 0.5], n_users)
    n_brands = np.array([len(c.brands) for c in CATEGORIES])
    brand = np.floor(rng.random((n_users, 3)) * n_brands[interests]).astype(np.int64)
    activity = rng.lognormal(0.0, 1.0, n_users)
    return _Users(
        interests=interests,
        interest_cdf=np.cumsum(weights, axis=1),
        brand=brand,
        brand_loyalty=rng.beta(2.0, 3.0, n_users),
        activity=activity / activity.sum(),
    )


@dataclass
class _Rows:
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    event: np.ndarray
    group: np.ndarray  # originating session: rows are kept or cut a session at a time

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("user", "item", "ts", "event", "group")
            )
        )


def _simulate(
    cat: _Catalogue, users: _Users, n_rows: int, days: int, start: int, b: Behaviour, rng: np.random.Generator
) -> _Rows:
    """Sessions in batches until there are enough rows, then whole sessions up to exactly n_rows."""
    parts: list[_Rows] = []
    total, next_session, per_session = 0, 0, 6.0
    while total < n_rows:
        n_sessions = int((n_rows - total) / per_session * 1.1) + 16
        batch = _sessions(cat, users, n_sessions, next_session, days, start, b, rng)
        next_session += n_sessions
        per_session = max(batch.user.size / n_sessions, 0.5)
        total += batch.user.size
        parts.append(batch)
    rows = _Rows.concat(parts)
    order = np.lexsort((rows.ts, rows.group))  # by session, then time inside it
    keep = order[:n_rows]
    keep = keep[np.argsort(rows.ts[keep], kind="stable")]
    out = _Rows(rows.user[keep], rows.item[keep], rows.ts[keep], rows.event[keep], rows.group[keep])
    _only_consumables_rebought(out, cat)
    return out


def _only_consumables_rebought(rows: _Rows, cat: _Catalogue) -> None:
    """A second purchase of the same durable item (a popular backpack drawn twice) becomes a view."""
    consumable = np.array([c.consumable for c in CATEGORIES])
    durable_buys = np.flatnonzero((rows.event == PURCHASE) & ~consumable[cat.category[rows.item]])
    key = rows.user[durable_buys] * cat.category.size + rows.item[durable_buys]
    _, first = np.unique(key, return_index=True)  # rows are time-sorted: the first is the real purchase
    again = np.ones(durable_buys.size, dtype=bool)
    again[first] = False
    rows.event[durable_buys[again]] = VIEW


def _sessions(
    cat: _Catalogue,
    users: _Users,
    n_sessions: int,
    first_id: int,
    days: int,
    start: int,
    b: Behaviour,
    rng: np.random.Generator,
) -> _Rows:
    end = start + days * DAY
    user = rng.choice(users.activity.size, n_sessions, p=users.activity)
    # Evening-heavy daily rhythm.
    hour = rng.choice(24, n_sessions, p=_HOUR_WEIGHTS)
    t0 = start + rng.integers(0, days, n_sessions) * DAY + hour * 3_600 + rng.integers(0, 3_000, n_sessions)
    slot = (rng.random(n_sessions)[:, None] > users.interest_cdf[user]).sum(axis=1).clip(0, 2)
    category = users.interests[user, slot]
    explore = rng.random(n_sessions) < b.p_explore
    category[explore] = rng.integers(0, len(CATEGORIES), int(explore.sum()))
    # Tiny catalogues may leave a category empty: shop a stocked one instead.
    stocked = np.flatnonzero(cat.by_category.has_items)
    empty = ~cat.by_category.has_items[category]
    category[empty] = stocked[rng.integers(0, stocked.size, int(empty.sum()))]
    loyal = ~explore & (rng.random(n_sessions) < users.brand_loyalty[user])
    pref_brand = users.brand[user, slot]

    n_views = 1 + rng.poisson(b.views_per_session, n_sessions)
    s = np.repeat(np.arange(n_sessions), n_views)  # one row per viewed item
    step = np.arange(s.size) - np.repeat(np.cumsum(n_views) - n_views, n_views)
    view_ts = t0[s] + step * 150
    item = cat.by_category.sample(category[s], rng.random(s.size))
    brand_group = category[s] * cat.max_brands + pref_brand[s]
    use_brand = loyal[s] & cat.by_brand.has_items[brand_group] & (rng.random(s.size) < 0.7)
    item[use_brand] = cat.by_brand.sample(brand_group[use_brand], rng.random(int(use_brand.sum())))
    not_out = cat.release_ts[item] > view_ts
    item[not_out] = cat.launched_by_category.sample(category[s][not_out], rng.random(int(not_out.sum())))

    click = rng.random(s.size) < b.p_click
    cart = click & (rng.random(s.size) < b.p_cart)
    buy = cart & (rng.random(s.size) < b.p_purchase)
    parts = [
        (s, item, view_ts, VIEW),
        (s[click], item[click], view_ts[click] + 20, CLICK),
        (s[cart], item[cart], view_ts[cart] + 60, CART),
        (s[buy], item[buy], view_ts[buy] + 100, PURCHASE),
    ]
    # Complementary items bought in the same session give co-occurrence its signal.
    with_comp = rng.random(int(buy.sum())) < b.p_complement
    anchor = item[buy][with_comp]
    comp = cat.complements[anchor, rng.integers(0, cat.complements.shape[1], anchor.size)]
    comp_s, comp_t = s[buy][with_comp], view_ts[buy][with_comp] + 110
    released = cat.release_ts[comp] <= comp_t
    comp, comp_s, comp_t = comp[released], comp_s[released], comp_t[released]
    parts += [
        (comp_s, comp, comp_t, VIEW),
        (comp_s, comp, comp_t + 10, CART),
        (comp_s, comp, comp_t + 20, PURCHASE),
    ]
    # Consumables are bought again about once per cycle, as their own small visits.
    consumable = np.array([c.consumable for c in CATEGORIES])
    rep_s, rep_item, rep_t = s[buy], item[buy], view_ts[buy] + 100
    for _ in range(6):
        again = consumable[cat.category[rep_item]] & (rng.random(rep_item.size) < b.p_repurchase)
        gap = rng.gamma(4.0, b.repurchase_cycle_days * DAY / 4.0, int(again.sum())).astype(np.int64) + 3_600
        rep_s, rep_item, rep_t = rep_s[again], rep_item[again], rep_t[again] + gap
        inside = rep_t < end - 200
        rep_s, rep_item, rep_t = rep_s[inside], rep_item[inside], rep_t[inside]
        if not rep_s.size:
            break
        parts += [(rep_s, rep_item, rep_t, CART), (rep_s, rep_item, rep_t + 60, PURCHASE)]

    sess = np.concatenate([p[0] for p in parts])
    ts = np.concatenate([p[2] for p in parts]).astype(np.int64)
    event = np.concatenate([np.full(p[0].size, p[3], dtype=np.int8) for p in parts])
    inside = ts < end  # a session running past the end of the window is cut there
    items = np.concatenate([p[1] for p in parts])
    return _Rows(user[sess][inside], items[inside], ts[inside], event[inside], (sess + first_id)[inside])


_HOUR_WEIGHTS = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3, 3, 3.5, 4, 3.5, 3, 3, 3.5, 4, 5, 6, 6.5, 6, 4, 2],
    dtype=np.float64,
)
_HOUR_WEIGHTS /= _HOUR_WEIGHTS.sum()


# ---------------------------------------------------------------------------------------------
# Output


def _ids(prefix: str, n: int) -> list[str]:
    width = len(str(max(n - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _interactions_frame(rows: _Rows, n_users: int, n_items: int) -> pl.DataFrame:
    user_names = pl.Series("user_id", _ids("user", n_users))
    item_names = pl.Series("item_id", _ids("item", n_items))
    event_names = pl.Series("event", EVENTS)
    return pl.DataFrame(
        [
            user_names.gather(rows.user),
            item_names.gather(rows.item),
            pl.Series("timestamp", rows.ts, dtype=pl.Int64),
            event_names.gather(rows.event.astype(np.int64)),
        ]
    )


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsvc-synth",
        description="Write a synthetic shop (interactions + items with text) as a canonical data folder.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created; existing files replaced)")
    p.add_argument(
        "--users", type=positive_int, default=2_000, help="number of simulated shoppers (default 2000)"
    )
    p.add_argument("--items", type=positive_int, default=1_000, help="catalogue size (default 1000)")
    p.add_argument(
        "--interactions",
        type=positive_int,
        default=50_000,
        help="exact number of interaction rows (default 50000)",
    )
    p.add_argument(
        "--days", type=positive_int, default=30, help="length of the simulated window in days (default 30)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (default 0); same seed and sizes give the same data"
    )
    p.add_argument(
        "--format",
        choices=("parquet", "csv"),
        default="parquet",
        help="file format to write (default parquet)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `recsvc-synth`; bad arguments print a message and exit 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    started = time.perf_counter()
    try:
        write_dataset(
            args.out,
            args.users,
            args.items,
            args.interactions,
            days=args.days,
            seed=args.seed,
            fmt=args.format,
        )
    except (ValueError, OSError) as exc:
        print(f"recsvc-synth: error: {exc}", file=sys.stderr)
        return 2
    log.info("done in %.1fs", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
