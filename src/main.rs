fn main() {
    println!("hpo-gpu");
}
