"""`python -m analysis schedules`: the signal-leak table of common schedules."""
from ldm_lite.schedules import format_schedule_table, schedule_table


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=50, help="number of inference steps (default 50)")
    parser.add_argument("--num-train-timesteps", type=int, default=1000, help="T (default 1000)")


def run(args):
    print(f"Signal kept at the first sampled step, T={args.num_train_timesteps}, N={args.steps} "
          "(steps_offset 1 for leading, as Stable Diffusion):")
    print(format_schedule_table(schedule_table(args.steps, args.num_train_timesteps)))
