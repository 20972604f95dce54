//! `mapet`: the MaPeT pre-training command.

fn main() {
    match mapet::cuda::unavailable_reason() {
        None => println!("mapet: CUDA device available"),
        Some(why) => println!("mapet: no GPU ({why}); the CPU backend is used"),
    }
}
