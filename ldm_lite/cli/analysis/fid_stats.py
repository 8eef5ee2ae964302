"""`python -m analysis fid-stats --data DIR|cifar10:ROOT --out ref.safetensors [--max-images N]`: Inception
feature statistics of a reference dataset for `python -m analysis fid` (protocol in ldm_lite/quality.py and
docs/quality.md). The file holds mu, sigma (float64), the count, the features (float32, for KID) and, as
metadata, the network's SHA1 and the protocol version; it is safetensors, never a pickle."""
from ldm_lite.checks import output_file
from ldm_lite.quality import load_images, statistics_of

DATA_HELP = "an image folder (searched recursively), 'cifar10:ROOT' (torchvision files, training split) or 'synthetic'"


def add_data_options(parser):
    """Options shared with the fid command for reading a dataset."""
    parser.add_argument("--max-images", type=int, default=0,
                        help="use this many images spread evenly over the dataset (0: all)")
    parser.add_argument("--resolution", type=int, default=None, help="resize (shorter side) and centre-crop "
                        "folder images to this size before the protocol's resize (default: the first image's "
                        "shorter side)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network batch")
    parser.add_argument("--device", default=None, help="device of the network (default: cuda if available)")


def add_arguments(parser):
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    add_data_options(parser)


def run(args):
    out = output_file(args.out, suffix=".safetensors")
    images, held = load_images(args.data, args.max_images, args.resolution)
    stats = statistics_of(images, batch_size=args.batch_size, device=args.device, source=args.data,
                          source_images=held)
    stats.save(out)
    print(f"wrote {out}: {stats.count} of {held} images of {args.data}, mu and sigma of 2048 Inception features")
